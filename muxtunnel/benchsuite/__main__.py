"""``python -m muxtunnel.benchsuite`` runs the bench without the CLI wrapper."""

from __future__ import annotations

import sys

from muxtunnel.benchsuite import main

sys.exit(main(sys.argv[1:]))
