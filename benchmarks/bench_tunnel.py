"""Run the muxtunnel benchmark suite without the CLI: ``python benchmarks/bench_tunnel.py ARGS``.

Same arguments as ``muxtunnel bench`` (see benchmarks/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muxtunnel.benchsuite import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
