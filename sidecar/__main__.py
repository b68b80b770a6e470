"""`python -m sidecar` is the same as the `llm-sidecar` console script."""

from sidecar.cli import main

raise SystemExit(main())
