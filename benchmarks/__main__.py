"""``python -m benchmarks``: run the benchmarks and print (or write) the markdown tables."""

from .cli import main

raise SystemExit(main())
