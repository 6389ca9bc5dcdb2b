"""muxtunnel: a self-hosted raw TCP tunnel multiplexed over one TLS connection."""

from __future__ import annotations

from muxtunnel._version import __version__

__all__ = ["__version__"]
