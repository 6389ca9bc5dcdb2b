"""The relay's port leases on disk: ``<state-dir>/leases.json`` (protocol-spec.md §10.5).

The relay keeps which token holds which public port in memory (:mod:`muxtunnel.registry`);
this module keeps a copy in the state dir so that a restart, clean or ``kill -9``, does not
hand a token's port to another token. The file holds, per lease: the port, the bind host, the
token's name (for a token configured in clear: its non-secret id, a hash), a short hash of the
token's stored key (a token re-created under the same name does not inherit the old one's
ports), the tunnel id (a client asking for port 0 gets its old port back by tunnel id), and the
wall-clock expiry (``null`` while a session holds the port: such a lease is given
``lease_seconds`` from the load). Never a token or a stored key.

Writes are atomic (a temporary file in the same directory, ``fsync``, ``rename``, ``fsync`` of
the directory) and run in a worker thread. A change after a quiet time is written at once;
changes that arrive while a write is in flight, or less than :data:`MIN_WRITE_INTERVAL` (0.1 s)
after it began, are coalesced into the next one, so a burst of BINDs costs a couple of writes,
not one per BIND, and steady churn costs at most one write per interval (longer when a write
takes more CPU: writing never takes more than about a fifth of the relay's time).
A file that cannot be parsed is reported in one log line and renamed aside
(``leases.json.corrupt-<UTC time>``); the relay starts with no leases. A state dir that cannot
be written is reported once; leases then live in memory only until a write works again (tried
at the next change, and every :data:`WRITE_RETRY_SECONDS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from typing import TYPE_CHECKING, NamedTuple

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from pathlib import Path

__all__ = [
    "LEASES_FILE_NAME",
    "LeaseStore",
    "StoredLease",
    "encode_leases",
    "key_id",
    "read_leases",
    "select",
    "write_atomic",
    "write_leases",
]

logger = logging.getLogger(__name__)

#: The file in the relay's state dir.
LEASES_FILE_NAME = "leases.json"
#: The format written (and the only one read).
FORMAT_VERSION = 1
#: After a failed write, try again this often (seconds) even if nothing changes.
WRITE_RETRY_SECONDS = 5.0
#: A write starts at most this often (seconds), and at most every ``WRITE_COST_FACTOR`` times
#: the CPU time the last one took (snapshot and encoding): while BINDs keep coming, writing
#: never takes more than a small share of the relay's time.
MIN_WRITE_INTERVAL = 0.1
WRITE_COST_FACTOR = 5.0


class StoredLease(NamedTuple):
    """One lease as written to disk (a tuple: the relay builds one per lease per write)."""

    port: int
    #: The token's name (a hash for a token configured in clear).
    token: str
    #: :func:`key_id` of the token's stored key.
    key: str
    #: The relay's bind host when the port was bound.
    host: str
    tunnel_id: int
    #: Wall-clock (``time.time()``) expiry; None while a session holds the port.
    expires: float | None

    def to_json(self) -> dict[str, object]:
        """The JSON object of this lease."""
        return {
            "port": self.port,
            "token": self.token,
            "key": self.key,
            "host": self.host,
            "tunnel": self.tunnel_id,
            "expires": self.expires,
        }


class CorruptLeases(ValueError):
    """The leases file is not what this module writes."""


def key_id(stored_key: bytes) -> str:
    """A short, non-secret hash of a token's stored key (tells a re-created token apart)."""
    return hashlib.sha256(b"muxtunnel lease key\x00" + stored_key).hexdigest()[:16]


def _int(obj: dict[str, object], name: str, lo: int, hi: int) -> int:
    value = obj.get(name)
    if type(value) is not int or not lo <= value <= hi:
        raise CorruptLeases(f"lease field {name!r}: expected an integer {lo}-{hi}, got {value!r}")
    return value


def _str(obj: dict[str, object], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise CorruptLeases(f"lease field {name!r}: expected a short string, got {value!r}")
    return value


def _parse(data: bytes) -> list[StoredLease]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptLeases(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise CorruptLeases(f"not a version {FORMAT_VERSION} leases file")
    items = doc.get("leases")
    if not isinstance(items, list):
        raise CorruptLeases("'leases' is not a list")
    out: list[StoredLease] = []
    for item in items:
        if not isinstance(item, dict):
            raise CorruptLeases(f"lease entry is not an object: {item!r:.60}")
        expires = item.get("expires")
        if expires is not None and (
            type(expires) not in (int, float) or not math.isfinite(float(expires))
        ):
            raise CorruptLeases(f"lease field 'expires': expected a time or null, got {expires!r}")
        out.append(
            StoredLease(
                port=_int(item, "port", 1, 65535),
                token=_str(item, "token"),
                key=_str(item, "key"),
                host=_str(item, "host"),
                tunnel_id=_int(item, "tunnel", 1, 2**32 - 1),
                expires=None if expires is None else float(expires),
            )
        )
    return out


def _set_aside(path: Path, why: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        os.replace(path, aside)
    except OSError as exc:
        logger.error(
            "leases file %s is unusable (%s) and cannot be renamed (%s); starting with no leases",
            path,
            why,
            exc.strerror or exc,
        )
        return
    logger.error(
        "leases file %s is unusable (%s); moved to %s, starting with no leases", path, why, aside
    )


def read_leases(path: Path) -> list[StoredLease]:
    """The leases in ``path``: none when it is missing; a corrupt or unreadable file is logged
    in one line and renamed aside (``<name>.corrupt-<UTC time>``), never raised."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        _set_aside(path, f"cannot read it: {exc.strerror or exc}")
        return []
    try:
        return _parse(data)
    except CorruptLeases as exc:
        _set_aside(path, str(exc))
        return []


def encode_leases(leases: Iterable[StoredLease]) -> bytes:
    """The file's content for ``leases``."""
    doc = {"version": FORMAT_VERSION, "leases": [lease.to_json() for lease in leases]}
    return json.dumps(doc, separators=(",", ":")).encode()


def write_leases(path: Path, leases: Iterable[StoredLease]) -> None:
    """Replace ``path`` atomically with ``leases`` (mode 0600, fsync of file and directory).

    Raises:
        OSError: The directory cannot be written.
    """
    write_atomic(path, encode_leases(leases))


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the directory.

    Raises:
        OSError: The directory cannot be written.
    """
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp: mode 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def select(
    leases: Sequence[StoredLease],
    *,
    keys: Mapping[str, str],
    host: str,
    port_range: tuple[int, int],
    now: float,
) -> tuple[list[StoredLease], dict[str, int]]:
    """The leases a starting relay keeps, and how many it drops for which reason.

    Dropped: expired (``expires`` <= ``now``), token no longer accepted or re-created with
    another key (``keys``: token name -> :func:`key_id`), another bind host, a port outside
    the range, a port listed twice.
    """
    lo, hi = port_range
    kept: dict[int, StoredLease] = {}
    dropped: dict[str, int] = {}
    for lease in leases:
        if lease.expires is not None and lease.expires <= now:
            why = "expired"
        elif keys.get(lease.token) != lease.key:
            why = "token removed"
        elif lease.host != host:
            why = "bind host changed"
        elif not lo <= lease.port <= hi:
            why = "port outside the range"
        elif lease.port in kept:
            why = "duplicate"
        else:
            kept[lease.port] = lease
            continue
        dropped[why] = dropped.get(why, 0) + 1
    return list(kept.values()), dropped


class LeaseStore:
    """Writes the relay's leases to ``path`` in the background, coalescing changes.

    ``snapshot()`` is called in the event loop whenever a write starts and returns every lease
    as it stands; :meth:`changed` asks for a write. Run :meth:`run` in a nursery. A change
    after a quiet time is written at once; changes during a write, or sooner than
    :data:`MIN_WRITE_INTERVAL` after the last one began, go into the next write.
    """

    def __init__(self, path: Path, snapshot: Callable[[], Sequence[StoredLease]]) -> None:
        self.path = path
        self._snapshot = snapshot
        self._dirty = trio.Event()
        self._idle = trio.Event()
        self._lock = threading.Lock()
        self._seq = 0
        self._written_seq = 0
        self._failing = False
        #: CPU seconds the last write took (snapshot in the loop, encoding in the thread).
        self._cost = 0.0
        #: Writes done (a burst of changes is coalesced into few of them).
        self.writes = 0

    def load(self) -> list[StoredLease]:
        """The leases on disk (see :func:`read_leases`)."""
        return read_leases(self.path)

    def changed(self) -> None:
        """Something changed: write soon (cheap; call it at every change)."""
        self._dirty.set()
        if self._idle.is_set():
            self._idle = trio.Event()

    async def wait_idle(self) -> None:
        """Wait until :meth:`run` has written every change made so far."""
        await self._idle.wait()

    async def run(self) -> None:
        """Write after every change, one write at a time, until cancelled (a failed write is
        tried again every :data:`WRITE_RETRY_SECONDS`)."""
        ok = True
        if not self._dirty.is_set():
            self._idle.set()
        while True:
            if ok:
                await self._dirty.wait()
            else:
                with trio.move_on_after(WRITE_RETRY_SECONDS):
                    await self._dirty.wait()
            began = trio.current_time()
            ok = await self.write()
            if ok and not self._dirty.is_set():
                self._idle.set()
            # Changes made meanwhile wait for the next write (one write for a burst).
            await trio.sleep_until(began + max(MIN_WRITE_INTERVAL, WRITE_COST_FACTOR * self._cost))

    async def write(self) -> bool:
        """Write the current leases now (in a worker thread); False if the write failed."""
        self._dirty = trio.Event()
        self._seq += 1
        began = time.perf_counter()
        records = tuple(self._snapshot())
        self._cost = time.perf_counter() - began
        return await trio.to_thread.run_sync(self._write, records, self._seq)

    def _write(self, records: Sequence[StoredLease], seq: int) -> bool:
        began = time.perf_counter()
        data = encode_leases(records)
        self._cost += time.perf_counter() - began
        with self._lock:
            if seq <= self._written_seq:
                return True  # a newer snapshot is already on disk
            try:
                write_atomic(self.path, data)
            except OSError as exc:
                if not self._failing:
                    self._failing = True
                    logger.warning(
                        "cannot write leases to %s: %s; leases are kept in memory only "
                        "until a write works",
                        self.path,
                        exc.strerror or exc,
                    )
                return False
            self._written_seq = seq
            self.writes += 1
            if self._failing:
                self._failing = False
                logger.info("leases are written to %s again", self.path)
            return True
