"""The README documents every environment variable and verb a user can set or run."""

from __future__ import annotations

from pathlib import Path

from demo.settings import DemoSettings
from feature_store.model_cli import RegistrySettings
from learner.settings import LearnerSettings
from mtlstream.cli import COMMANDS
from mtlstream.services import ServicesSettings
from mtlstream.settings import describe
from serving.settings import ServingSettings
from stream.settings import StreamSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SETTINGS = (
    ServicesSettings,
    StreamSettings,
    LearnerSettings,
    ServingSettings,
    RegistrySettings,
    DemoSettings,
)


def test_every_settings_env_var_is_documented() -> None:
    missing = [env for cls in SETTINGS for env, _, _ in describe(cls) if f"`{env}`" not in README]
    assert not missing, f"README lacks {missing}"


def test_every_verb_is_documented() -> None:
    missing = [verb for verb in COMMANDS if f"`{verb}" not in README]
    assert not missing, f"README lacks verbs {missing}"


def test_the_test_command_is_the_ci_command() -> None:
    ci = (Path(__file__).resolve().parents[2] / ".ci/run").read_text().split()
    assert ci[-2:] == ["make", "test"] and "make test" in README
