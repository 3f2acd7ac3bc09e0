"""`python -m multihead …` runs the `multihead` command."""

from .cli import main

raise SystemExit(main())
