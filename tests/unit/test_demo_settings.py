"""Demo settings, flags and the children's command lines and environments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
import pytest

from demo.cli import configure, settings_from_args
from demo.runner import RunFiles, child_specs, demo_model_args, topic_names
from demo.settings import DemoSettings, from_env
from learner.settings import LearnerSettings
from mtlstream.errors import SettingsError
from serving.settings import ServingSettings
from stream.settings import StreamSettings
from stream.simulate_cli import configure as configure_simulate
from stream.world import WorldConfig


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(argv)


def test_flags_override_the_environment_which_overrides_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MTL_DEMO_DURATION_S", "90")
    monkeypatch.setenv("MTL_DEMO_RATE", "111")
    monkeypatch.setenv("MTL_DEMO_VIEW", "true")
    settings = settings_from_args(parse("--duration", "30", "--no-view", "--keep-data"))
    assert settings.duration_s == 30.0  # flag
    assert settings.rate == 111.0  # environment
    assert settings.speedup == 60.0  # default
    assert settings.view is False and settings.keep_data is True
    assert settings_from_args(parse()).view is True


def test_names_derive_from_the_run_id() -> None:
    settings = from_env(DemoSettings, {}, run_id="abc")
    assert settings.prefix == "demo-abc"
    assert topic_names(settings)["samples"] == "demo-abc.samples"
    assert settings.redis_namespace == "mtl:demo-abc:"
    assert settings.out_path == Path(".mtlstream/demo/abc")
    fresh = [from_env(DemoSettings, {}).run_id for _ in range(2)]
    assert fresh[0] != fresh[1]
    named = from_env(DemoSettings, {"MTL_DEMO_NAMESPACE": "x:", "MTL_DEMO_OUT": "o"})
    assert named.redis_namespace == "x:" and named.out_path == Path("o")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MTL_DEMO_RUN_ID": "has space"}, "MTL_DEMO_RUN_ID"),
        ({"MTL_DEMO_WINDOW_S": "60"}, "MTL_DEMO_WINDOW_S >= 120"),
        ({"MTL_DEMO_SCORER_RUNTIME": "tpu"}, "MTL_DEMO_SCORER_RUNTIME"),
        ({"MTL_DEMO_DURATION_S": "0", "MTL_DEMO_RATE": "-1"}, "DURATION_S > 0, MTL_DEMO_RATE"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        from_env(DemoSettings, env)


def test_world_config_is_a_valid_world_with_the_demo_windows() -> None:
    settings = from_env(DemoSettings, {"MTL_DEMO_WINDOW_S": "120"}, run_id="w")
    world = WorldConfig(**settings.world_config())
    assert world.window_s == 120.0 and world.run_id == "w"
    assert world.click_delay_median_s < world.window_s
    assert world.follow_delay_median_s < world.window_s


def test_children_share_the_run_topics_and_get_what_their_settings_need(tmp_path: Path) -> None:
    settings = from_env(DemoSettings, {}, run_id="r9", publish_every_s=3.0, window_s=200.0)
    files = RunFiles(tmp_path)
    base = {"PATH": "/bin", "MTL_SNAPSHOTS_KEEP": "50"}
    specs = {s.name: s for s in child_specs(settings, files, "k:9092", "redis://r/0", 8123, base)}
    assert list(specs) == ["stream", "learn", "serve", "simulate"]
    for spec in specs.values():
        assert spec.argv[:4] == (sys.executable, "-m", "mtlstream", spec.name)
        assert spec.log == tmp_path / "logs" / f"{spec.name}.log"
        assert spec.env is not None
        assert spec.env["MTL_DEMO_RUN_ID"] == "r9" and spec.env["PATH"] == "/bin"
    # each child's own settings, read from its environment, point at the run's resources
    assert specs["stream"].env is not None and specs["learn"].env is not None
    assert specs["serve"].env is not None
    stream = from_env(StreamSettings, specs["stream"].env)
    learner = from_env(LearnerSettings, specs["learn"].env)
    serving = from_env(ServingSettings, specs["serve"].env)
    assert stream.samples_topic == learner.samples_topic == "demo-r9.samples"
    assert stream.impressions_topic == "demo-r9.impressions" and stream.partitions == 2
    assert stream.app_id == "demo-r9" and stream.click_window_ms == 200_000
    assert stream.follow_window_ms == 200_000 and stream.max_future_skew_ms == -1
    assert stream.namespace == learner.namespace == serving.namespace == "mtl:demo-r9:"
    assert learner.publish_every_s == 3.0 and learner.keep == 50  # the caller's env passes
    assert learner.metrics_path == tmp_path / "learner-metrics.jsonl"
    assert "item_ctr_1h" not in learner.model_args()["features"]["dense"]
    assert serving.port == 8123 and serving.runtime == "torch"
    # the simulator closes the loop through the scorer and writes the run's files
    parser = argparse.ArgumentParser()
    configure_simulate(parser)
    args = parser.parse_args(specs["simulate"].argv[4:])
    assert args.scorer == "http://127.0.0.1:8123" and args.bootstrap == "k:9092"
    assert args.served_log == files.served_log and args.truth_file == files.truth
    assert args.write_item_features and args.duration is None
    assert orjson.loads(args.world) == settings.world_config()


def test_the_callers_model_args_win_over_the_demo_default(tmp_path: Path) -> None:
    settings = from_env(DemoSettings, {}, run_id="m")
    mine = '{"arch": "mmoe"}'
    specs = child_specs(settings, RunFiles(tmp_path), "k", "r", 1, {"MTL_LEARNER_MODEL_ARGS": mine})
    learn = next(s for s in specs if s.name == "learn")
    assert learn.env is not None and learn.env["MTL_LEARNER_MODEL_ARGS"] == mine
    default = orjson.loads(demo_model_args())["features"]
    assert [f["name"] for f in default["categorical"]] == [
        "user_id",
        "item_id",
        "user_segment",
        "item_category",
    ]


def test_simulate_world_flag_rejects_unknown_fields() -> None:
    from stream.simulate_cli import _world_values

    assert _world_values('{"n_users": 7}') == {"n_users": 7}
    assert _world_values(None) == {}
    with pytest.raises(ValueError, match="unknown WorldConfig fields"):
        _world_values('{"n_userz": 7}')
    with pytest.raises(ValueError, match="JSON object"):
        _world_values("[1]")
