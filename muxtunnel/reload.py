"""Signals of a running relay or client: SIGHUP (reload) and SIGUSR1 (one status line).

Relay, SIGHUP: the configuration is read again the way it was at start (the same command-line
flags over a fresh read of ``--config`` and of the token file) and applied without a restart.

Reloadable (apply at once, or to the next session / BIND / visitor as noted):

- the accepted tokens and their policies: ``token``, ``token-file`` (named TOML or one per
  line), ``MUXTUNNEL_TOKEN`` and the state dir's ``tokens.toml``. A session whose token is
  still accepted goes on untouched and its new policy applies to its next BIND, visitor and
  chunk; a session whose token was removed (or whose name now has another key) is closed at
  once with ``CLOSE(AUTH_FAILED, "token revoked")`` and every port of that token is released
  at once (not after ``--lease``); its resumption tickets die and its sessions waiting for a
  resume (protocol-spec.md §10.6) end at once; an added token is accepted at once;
- ``max-sessions-per-token``, ``max-tunnels-per-token``, ``max-streams-per-token``,
  ``max-visitors-per-tunnel``, ``max-tunnels-per-client`` (next BIND or visitor);
- ``max-startups``, ``max-startups-per-source``, ``auth-failures``, ``auth-ban`` (next
  connection);
- ``handshake-timeout``, ``keepalive-timeout``, ``open-timeout``, ``stall-timeout``,
  ``max-visit-streams``, ``resume-window`` (next session), ``drain-timeout``;
- ``log-level`` and ``log-format``.

Need a restart (a changed value is logged and ignored): ``listen``, ``ports``, ``bind``,
``cert``, ``key``, ``state-dir``, ``lease``, ``admin``, ``metrics``.

A reload that fails (unreadable or invalid file, duplicate token ...) changes nothing and logs
one line saying why. The service manager hears ``RELOADING=1`` then ``READY=1``
(:mod:`muxtunnel.sdnotify`).

Relay, SIGUSR1: one INFO line ``status: N sessions, N tunnels, N open streams``; nothing else
changes.

Client, SIGHUP: the client keeps its token and tunnels (they are sent to the relay once per
session); it logs ``reload is not supported by the client; restart it`` and goes on. SIGUSR1
logs its status line.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from typing import TYPE_CHECKING

import trio

from muxtunnel.errors import ErrorCode, MuxtunnelError

if TYPE_CHECKING:
    from collections.abc import Callable

    from muxtunnel.config import ServerConfig
    from muxtunnel.sdnotify import Notifier
    from muxtunnel.server import RelaySession, _Relay

__all__ = [
    "RESTART_ONLY",
    "REVOKED_MESSAGE",
    "apply_reload",
    "client_signals",
    "refresh_token",
    "relay_signals",
    "relay_status",
]

logger = logging.getLogger("muxtunnel.reload")

#: The CLOSE message a session gets when its token is removed by a reload.
REVOKED_MESSAGE = "token revoked"

#: ServerConfig fields (and their option names) that a reload cannot change.
RESTART_ONLY: dict[str, str] = {
    "listen_host": "listen",
    "listen_port": "listen",
    "port_range": "ports",
    "bind_host": "bind",
    "cert_file": "cert",
    "key_file": "key",
    "state_dir": "state-dir",
    "lease_seconds": "lease",
    "admin": "admin",
    "metrics": "metrics",
}


def relay_status(relay: _Relay) -> str:
    """One line: sessions, tunnels and open streams of the relay."""
    sessions = list(relay.sessions)
    tunnels = sum(len(rs.tunnels) for rs in sessions)
    streams = sum(rs.active_streams for rs in sessions)
    suspended = sum(1 for rs in sessions if rs.suspended_at is not None)
    waiting = f", {suspended} waiting for a resume" if suspended else ""
    return f"{len(sessions)} sessions, {tunnels} tunnels, {streams} open streams{waiting}"


def _revoke(relay: _Relay, rs: RelaySession) -> int:
    """Close ``rs`` (its token was removed) and release its ports now; the ports released.

    Its resumption ticket dies with it, and a session waiting for a resume ends at once.
    """
    relay.tickets.revoke(rs)
    ports = 0
    for lease in list(rs.tunnels.values()):
        if lease.owner is rs:
            relay.registry.release(lease, rs)
            ports += 1
    logger.info(
        "client %s: token %s revoked; session closed, %d ports released",
        rs.peer,
        rs.token.name,
        ports,
    )
    rs.conn.close(ErrorCode.AUTH_FAILED, REVOKED_MESSAGE)
    return ports


def refresh_token(relay: _Relay, rs: RelaySession) -> None:
    """A session admitted with a token list read before a reload: give it its token's current
    entry, or close it (revoked) when the reload removed the token."""
    entry = next((e for e in relay.config.accepted_tokens() if e.name == rs.token.name), None)
    if entry is not None and entry.stored_key == rs.token.stored_key:
        rs.token = entry
    elif rs.alive:
        _revoke(relay, rs)


def apply_reload(relay: _Relay, new: ServerConfig) -> str:
    """Apply ``new`` to the running ``relay``; a one-line summary of what changed.

    Raises:
        ConfigError: ``new`` has no token, or two tokens clash (nothing is changed then).
    """
    from muxtunnel.errors import ConfigError

    entries = {entry.name: entry for entry in new.accepted_tokens()}
    if not entries:
        raise ConfigError("no token configured")
    old = relay.config
    kept = {
        field: getattr(old, field)
        for field in RESTART_ONLY
        if hasattr(old, field) and getattr(old, field) != getattr(new, field)
    }
    if kept:
        names = sorted({RESTART_ONLY[field] for field in kept})
        logger.warning("reload: %s changed; this takes a restart", ", ".join(names))
        new = dataclasses.replace(new, **kept)
    old_entries = {entry.name: entry for entry in old.accepted_tokens()}
    relay.config = new
    relay.registry.max_per_token = new.max_tunnels_per_token
    admission = relay.admission
    admission.max_startups = new.max_startups
    admission.per_source = new.max_startups_per_source
    admission.auth_failures = new.auth_failures
    admission.ban = new.auth_ban
    admission.max_ban = max(admission.max_ban, new.auth_ban)

    sessions = set(relay.sessions)
    for usage in relay.usage.values():
        sessions |= usage.sessions
    closed = 0
    for rs in sessions:
        entry = entries.get(rs.token.name)
        if entry is not None and entry.stored_key == rs.token.stored_key:
            rs.token = entry  # new policy for the next BIND, visitor and chunk
        elif rs.alive:
            _revoke(relay, rs)
            closed += 1
    for name, before in old_entries.items():
        current = entries.get(name)
        if current is None or current.stored_key != before.stored_key:
            relay.tickets.revoke_token(name)  # no resume with the old key (protocol-spec §10.6)
    # Ports kept for a gone session of a removed (or re-keyed) token: free now, not after
    # the lease (and dropped from the state dir's leases file).
    for lease in list(relay.registry.leases.values()):
        entry = entries.get(lease.token_id)
        previous = old_entries.get(lease.token_id)
        if entry is None or (previous is not None and previous.stored_key != entry.stored_key):
            relay.registry.release(lease)

    added = sorted(set(entries) - set(old_entries))
    removed = sorted(set(old_entries) - set(entries))
    changed = sorted(
        name for name in set(entries) & set(old_entries) if entries[name] != old_entries[name]
    )
    parts = [f"{len(entries)} tokens"]
    for what, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            parts.append(f"{what} {', '.join(names)}")
    parts.append(f"{closed} sessions closed")
    return "; ".join(parts)


async def relay_signals(
    relay: _Relay, load: Callable[[], ServerConfig], notifier: Notifier
) -> None:
    """Handle SIGHUP (reload with ``load()``) and SIGUSR1 (status line) until cancelled."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGUSR1) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                logger.info("status: %s", relay_status(relay))
                continue
            notifier.reloading()
            try:
                summary = apply_reload(relay, load())
            except (MuxtunnelError, OSError, ValueError) as exc:
                logger.error("reload failed, keeping the old settings: %s", exc)
            else:
                logger.info("reloaded: %s", summary)
            notifier.ready(relay_status(relay))


async def client_signals(status: Callable[[], str]) -> None:
    """Client: SIGHUP logs that reload needs a restart; SIGUSR1 logs ``status()``."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGUSR1) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                logger.info("status: %s", status())
            else:
                logger.warning("reload is not supported by the client; restart it")
