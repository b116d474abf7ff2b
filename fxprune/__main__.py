"""``python -m fxprune``: the same as the ``fxprune`` console script."""
from fxprune.cli import main

raise SystemExit(main())
