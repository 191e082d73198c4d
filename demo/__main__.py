"""`python -m demo`: run `mtlstream demo` directly (same flags, same logging, same exit codes)."""

from __future__ import annotations

import argparse
import logging
import os

from demo.cli import configure, main
from mtlstream.cli import setup_logging
from mtlstream.errors import MtlstreamError

parser = argparse.ArgumentParser(prog="mtlstream demo", description="the closed-loop demo")
configure(parser)
args = parser.parse_args()
setup_logging(os.environ.get("MTL_LOG_LEVEL", "INFO"))
try:
    code = main(args)
except MtlstreamError as exc:
    logging.getLogger("demo").error("%s: %s", type(exc).__name__, exc)
    code = 2
raise SystemExit(code)
