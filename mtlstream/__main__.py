"""`python -m mtlstream`: dispatch to the console script."""

from mtlstream.cli import main

raise SystemExit(main())
