"""Atomic checkpoints: files, pointer, pruning, corruption, and a full learner round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
import torch

from learner.batching import decode_records
from learner.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    save_checkpoint,
)
from learner.daemon import Learner
from learner.errors import ConfigError
from learner.settings import LearnerSettings
from learner.source import RecordBatch

SMALL_MODEL = orjson.dumps(
    {
        "config": {"expert_hidden": [8]},
        "tower_hidden": [4],
        "features": {
            "categorical": [
                {"name": "user_id", "buckets": 64, "dim": 4},
                {"name": "item_category", "buckets": 16, "dim": 2},
            ],
            "dense": ["item_price"],
        },
    }
).decode()


def test_round_trip_keeps_tensors_and_meta(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.randn(3, 2),
        "f64": torch.arange(4, dtype=torch.float64),
        "i64": torch.tensor([-1, 2**62]),
        "scalar": torch.tensor(7.0),
    }
    path = save_checkpoint(tmp_path, tensors, {"step": 5, "offsets": {"0": 10}})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.path == path
    for name, value in tensors.items():
        assert torch.equal(ckpt.tensors[name], value), name
        assert ckpt.tensors[name].dtype == value.dtype
    assert ckpt.meta["step"] == 5 and ckpt.meta["offsets"] == {"0": 10}
    assert (tmp_path / "LATEST").read_text() == path.name


def test_no_checkpoint_yet(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "missing") is None
    assert load_checkpoint(tmp_path) is None


def test_keeps_the_newest_and_removes_leftovers_of_a_crash(tmp_path: Path) -> None:
    (tmp_path / ".tmp-deadbeef").mkdir()  # a save that crashed before its rename
    (tmp_path / ".tmp-LATEST-x").write_text("ckpt-garbage")
    for step in range(4):
        save_checkpoint(tmp_path, {"w": torch.full((2,), float(step))}, {"step": step}, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "LATEST" and len(names) == 3
    assert [n[:17] for n in names[1:]] == ["ckpt-000000000002", "ckpt-000000000003"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.meta["step"] == 3 and ckpt.tensors["w"][0] == 3.0


def test_a_crash_before_the_pointer_flips_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"w": torch.zeros(1)}, {"step": 1})
    # what a crash between the rename and the LATEST replace leaves behind
    orphan = tmp_path / "ckpt-000000000002-1"
    orphan.mkdir()
    (orphan / "meta.json").write_text("{")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.meta["step"] == 1


def test_corruption_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, {"w": torch.ones(4)}, {"step": 1})
    blob = bytearray((path / "tensors.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (path / "tensors.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(tmp_path, {"w": torch.ones(4)}, {"step": 2})
    meta = orjson.loads((path / "meta.json").read_bytes())
    (path / "meta.json").write_bytes(orjson.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(tmp_path)


def _sparse_setup(seed: int) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(50, 4, sparse=True)
    lin = torch.nn.Linear(4, 1)
    model = torch.nn.Sequential(emb, lin)
    opts: list[torch.optim.Optimizer] = [
        torch.optim.Adam(lin.parameters(), lr=0.01),
        torch.optim.SparseAdam([emb.weight], lr=0.05),
    ]
    return model, opts


def _step(model: torch.nn.Module, opts: list[torch.optim.Optimizer], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50, (16,), generator=gen)
    loss = model(idx).square().mean()
    torch.autograd.backward(loss)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_optimizer_state_round_trip_continues_identically(tmp_path: Path) -> None:
    model, opts = _sparse_setup(0)
    for s in range(3):
        _step(model, opts, s)
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {}
    for i, opt in enumerate(opts):
        t, m = optimizer_state(opt, f"optim.{i}")
        tensors.update(t)
        meta[str(i)] = m
    save_checkpoint(tmp_path, tensors, {"step": 3, "optim": meta})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None
    clone, clone_opts = _sparse_setup(1)  # different init: everything must come from the file
    clone.load_state_dict({k[6:]: v for k, v in ckpt.tensors.items() if k.startswith("model.")})
    for i, opt in enumerate(clone_opts):
        load_optimizer_state(opt, ckpt.tensors, f"optim.{i}", ckpt.meta["optim"][str(i)])
    _step(model, opts, 3)
    _step(clone, clone_opts, 3)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


# --- the learner's own checkpoint (no Kafka: batches are fed to train_on directly) ------------


def _sample(i: int) -> bytes:
    click = int(i % 3 == 0)
    return orjson.dumps(
        {
            "sample_id": f"imp-{i}",
            "user_id": f"u{i % 13}",
            "item_id": f"i{i % 7}",
            "features": {"user_id": f"u{i % 13}", "item_category": f"c{i % 5}", "item_price": i},
            "ts": 1_700_000_000_000 + i,
            "labels": {"click": click, "conversion": click * (i % 2), "ysl": click * (i % 2)},
            "masks": {"ctr": 1, "cvr": click, "ctcvr": 1, "ysl": click},
            "kind": "final",
            "revision": 0,
            "elapsed_ms": 10,
            "emitted_at": 1_700_000_500_000 + i,
        }
    )


def _learner(tmp_path: Path, **overrides: Any) -> Learner:
    settings = LearnerSettings(
        checkpoint_dir=tmp_path / "ckpt",
        metrics_file=str(tmp_path / "metrics.jsonl"),
        model_args_json=SMALL_MODEL,
        device="cpu",
        dedupe_horizon=1000,
        **overrides,
    )
    # never connected: these tests publish nothing
    return Learner(settings, redis.Redis(host="127.0.0.1", port=1))


def _batch(ids: range, partition: int = 0, extra: list[bytes] | None = None) -> RecordBatch:
    values = [_sample(i) for i in ids] + (extra or [])
    cols = decode_records(values, _learner_spec())
    return RecordBatch(cols, len(values), {partition: ids.stop + len(extra or [])})


def _learner_spec() -> Any:
    from learner.features import FeatureSpec

    return FeatureSpec.from_dict(orjson.loads(SMALL_MODEL)["features"])


def test_learner_checkpoint_restores_everything_and_training_continues_identically(
    tmp_path: Path,
) -> None:
    learner = _learner(tmp_path)
    learner.train_on(_batch(range(0, 64)))
    learner.train_on(_batch(range(32, 96), extra=[b"{bad"]))  # 32 duplicates, 1 bad record
    learner.checkpoint()
    restored = _learner(tmp_path)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt is not None
    restored.restore(ckpt)
    assert restored.state == learner.state
    assert (restored.state.samples, restored.state.duplicates) == (96, 32)
    assert restored.state.bad == {"invalid_json": 1}
    assert restored.deduper.checksum == learner.deduper.checksum
    cumulative = {k: v for k, v in learner.metrics.get().items() if not k.endswith("_w")}
    assert {
        k: v for k, v in restored.metrics.get().items() if not k.endswith("_w")
    } == pytest.approx(cumulative, nan_ok=True)
    nxt = _batch(range(90, 160))  # 6 ids the dedupe remembers
    learner.train_on(nxt)
    restored.train_on(nxt)
    assert restored.state.duplicates == learner.state.duplicates == 38
    for (name, a), b in zip(
        learner.model.state_dict().items(), restored.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert torch.equal(
        learner.loss_fn.weighting.log_vars.detach(),  # type: ignore[union-attr]
        restored.loss_fn.weighting.log_vars.detach(),  # type: ignore[union-attr]
    )


def test_learner_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    learner = _learner(tmp_path)
    learner.train_on(_batch(range(0, 16)))
    learner.checkpoint()
    other = _learner(tmp_path, arch="mmoe")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt is not None
    with pytest.raises(ConfigError, match="model_args"):
        other.restore(ckpt)


def test_learner_metrics_history_records_gate_statistics(tmp_path: Path) -> None:
    learner = _learner(tmp_path)
    learner.train_on(_batch(range(0, 48)))
    learner.write_history(123.0)
    record = orjson.loads((tmp_path / "metrics.jsonl").read_bytes().splitlines()[-1])
    assert record["samples"] == 48 and record["samples_per_s"] == 123.0
    gates = record["gates"]
    assert "level0/ctr" in gates and "level0/shared" in gates
    means = np.array(gates["level0/ctr"]["mean"])
    assert means.shape == (3,) and means.sum() == pytest.approx(1.0, abs=1e-5)
