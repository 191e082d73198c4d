"""`mtlstream serve [--host H] [--port P] [--check]`: run the scorer with uvicorn, or probe it.

``--check`` asks a running scorer's ``/health`` and sets the exit code (0 healthy, 1 not), for
Docker's HEALTHCHECK, like ``arq --check``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from types import FrameType

import httpx

from serving.settings import RUNTIMES, ServingSettings, from_env

__all__ = ["check", "configure", "main"]

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` arguments (each overrides its environment variable)."""
    parser.add_argument("--host", help="address to listen on (env MTL_SERVE_HOST)")
    parser.add_argument("--port", type=int, help="HTTP port (env MTL_SERVE_PORT)")
    parser.add_argument("--redis-url", help="Redis URL (env REDIS_URL)")
    parser.add_argument("--namespace", help="Redis key prefix (env MTL_NAMESPACE)")
    parser.add_argument("--model-name", help="snapshot model name (env MTL_MODEL_NAME)")
    parser.add_argument("--runtime", choices=RUNTIMES, help="model runtime (env MTL_SERVE_RUNTIME)")
    parser.add_argument(
        "--check", action="store_true", help="probe a running scorer's /health and exit 0 or 1"
    )


def check(settings: ServingSettings, timeout_s: float = 3.0) -> int:
    """Ask ``/health``; write one status line; return 0 when healthy, else 1."""
    url = f"{settings.base_url}/health"
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        sys.stdout.write(f"scorer url={url} healthy=False error={exc!r}\n")
        return 1
    healthy = response.status_code == 200
    sys.stdout.write(f"scorer url={url} healthy={healthy} body={response.text.strip()}\n")
    return 0 if healthy else 1


def main(args: argparse.Namespace) -> int:
    """Run the scorer until SIGTERM / SIGINT, or probe it with ``--check``."""
    settings = from_env(
        ServingSettings,
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        namespace=args.namespace,
        model_name=args.model_name,
        runtime=args.runtime,
    )
    if args.check:
        return check(settings)
    import uvicorn

    from serving.app import create_app

    # a 500-candidate request allocates ~10k short-lived objects: with the default gen0 threshold
    # (700) that is a dozen collections per request, each also walking survivors of earlier ones
    gc.set_threshold(50_000, 20, 20)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the dictConfig of mtlstream.cli
        access_log=settings.access_log,
        lifespan="on",
    )
    logger.info("serving on %s", settings.base_url)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal into the handler that
    # was installed before it: make that a clean exit (0) rather than death by signal (-15)
    signal.signal(signal.SIGTERM, _exit_after_shutdown)
    uvicorn.Server(config).run()
    return 0


def _exit_after_shutdown(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
