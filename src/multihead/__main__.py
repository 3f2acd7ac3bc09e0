"""`python -m multihead …` runs the `multihead` command."""

from .tools.cli import main

raise SystemExit(main())
