"""``python -m hf_efftrain`` (and ``accelerate launch -m hf_efftrain``) runs the CLI."""

from .cli import main

raise SystemExit(main())
