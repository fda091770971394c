"""``python -m droppath_inject``: the same command line as the ``droppath-inject`` script."""

from .cli import main

raise SystemExit(main())
