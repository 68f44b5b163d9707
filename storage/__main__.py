"""Entry point of ``python -m storage``."""

from storage.cli import main

raise SystemExit(main())
