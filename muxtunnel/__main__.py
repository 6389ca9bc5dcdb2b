"""``python -m muxtunnel`` runs the command-line interface."""

from __future__ import annotations

from muxtunnel.cli import main

main()
