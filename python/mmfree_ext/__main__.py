"""``python -m mmfree_ext``: the same command line as the ``mmfree`` console script."""

from .cli import main

raise SystemExit(main())
