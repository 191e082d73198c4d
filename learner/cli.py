"""`mtlstream learn`: run the learner daemon, or `--check` its health (exit code 0 = healthy).

Every flag overrides the environment variable of the same setting (see
:class:`learner.settings.LearnerSettings`); flags not given fall through to the environment,
then to the defaults. The `report` verb lives in :mod:`learner.report`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import redis

from learner.daemon import Learner, check_health
from learner.errors import LearnerError
from learner.settings import DEVICES, LearnerSettings
from mtlstream.settings import from_env

__all__ = ["configure", "main", "settings_from_args"]

logger = logging.getLogger(__name__)

# flag -> (settings field, type, help)
_FLAGS: dict[str, tuple[str, type, str]] = {
    "--topic": ("samples_topic", str, "samples topic (MTL_SAMPLES_TOPIC)"),
    "--group": ("group_id", str, "consumer group (MTL_LEARNER_GROUP)"),
    "--model-name": ("model_name", str, "snapshot name (MTL_MODEL_NAME)"),
    "--arch": ("arch", str, "model architecture (MTL_LEARNER_ARCH)"),
    "--model-args": ("model_args_json", str, "JSON ModelArgs overrides (MTL_LEARNER_MODEL_ARGS)"),
    "--batch-size": ("batch_size", int, "samples per micro-batch (MTL_LEARNER_BATCH_SIZE)"),
    "--lr": ("lr", float, "learning rate (MTL_LEARNER_LR)"),
    "--weighting": ("weighting", str, "static | uwl | decay (MTL_LEARNER_WEIGHTING)"),
    "--checkpoint-dir": ("checkpoint_dir", Path, "checkpoint directory (MTL_CHECKPOINT_DIR)"),
    "--checkpoint-every-s": ("checkpoint_every_s", float, "MTL_CHECKPOINT_EVERY_S"),
    "--checkpoint-every-samples": ("checkpoint_every_samples", int, "MTL_CHECKPOINT_EVERY_SAMPLES"),
    "--publish-every-s": ("publish_every_s", float, "MTL_PUBLISH_EVERY_S"),
    "--publish-every-samples": ("publish_every_samples", int, "MTL_PUBLISH_EVERY_SAMPLES"),
    "--log-every-s": ("log_every_s", float, "status line period (MTL_LEARNER_LOG_EVERY_S)"),
    "--metrics-file": ("metrics_file", str, "metrics history JSONL (MTL_LEARNER_METRICS_FILE)"),
    "--max-samples": ("max_samples", int, "burst: stop after N records (MTL_LEARNER_MAX_SAMPLES)"),
    "--until-idle": ("until_idle_s", float, "burst: stop after N idle seconds"),
    "--torch-threads": ("torch_threads", int, "torch CPU threads (MTL_LEARNER_TORCH_THREADS)"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `learn` flags."""
    parser.add_argument(
        "--check", action="store_true", help="exit 0 if the learner's health key is alive, else 1"
    )
    parser.add_argument("--device", choices=DEVICES, help="MTL_LEARNER_DEVICE")
    for flag, (dest, kind, help_text) in _FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, help=help_text)


def settings_from_args(args: argparse.Namespace) -> LearnerSettings:
    """Build the settings: environment first, given flags on top."""
    overrides = {dest: getattr(args, dest, None) for dest, _, _ in _FLAGS.values()}
    overrides["device"] = getattr(args, "device", None)
    return from_env(LearnerSettings, **overrides)


def main(args: argparse.Namespace) -> int:
    """Run the daemon until stopped (exit 0), or check its health."""
    settings = settings_from_args(args)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        if args.check:
            return 0 if check_health(settings, client) else 1
        learner = Learner(settings, client)
        learner.install_signal_handlers()
        learner.run()
        return 0
    except LearnerError as exc:
        logger.error("%s: %s", type(exc).__name__, exc)
        return 2
    finally:
        client.close()
