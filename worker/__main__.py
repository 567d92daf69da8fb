"""``python -m worker`` runs the ``space`` CLI."""

from worker.cli import main

raise SystemExit(main())
