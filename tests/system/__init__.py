"""System tests: real muxtunnel processes carrying real OpenSSH and PostgreSQL traffic."""

from __future__ import annotations
