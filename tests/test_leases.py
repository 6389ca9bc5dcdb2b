"""Durable port leases: the leases file (muxtunnel.leasestore) and the registry's restore
(protocol-spec.md §10.5). Real files, real sockets; the relay processes are in
tests/system/test_lease_restart.py."""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel import leasestore, tls
from muxtunnel.config import ServerConfig
from muxtunnel.leasestore import (
    LEASES_FILE_NAME,
    LeaseStore,
    StoredLease,
    key_id,
    read_leases,
    select,
    write_leases,
)
from muxtunnel.policy import DEFAULT_POLICY
from muxtunnel.protocol.constants import ResultStatus
from muxtunnel.registry import BindError, PortLease, PortRegistry
from muxtunnel.reload import apply_reload
from muxtunnel.server import _Relay
from muxtunnel.tokens import plaintext_entry
from tests.conftest import TOKEN, free_port_range

if TYPE_CHECKING:
    from pathlib import Path

TOKEN_B = "second-token-fedcba9876543210"


def _lease(port: int, token: str = "alice", expires: float | None = None) -> StoredLease:
    return StoredLease(port, token, key_id(b"k-" + token.encode()), "127.0.0.1", 1, expires)


class _Owner:
    """A stand-in for a relay session."""

    def __init__(self, token_id: str) -> None:
        self.token_id = token_id
        self.alive = True

    async def probe(self, within: float) -> bool:
        await trio.lowlevel.checkpoint()
        return self.alive

    def replaced(self, reason: str) -> None:
        self.alive = False


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the file ------------------------------------------------------------------------------


def test_round_trip_private_file_and_no_secret(tmp_path: Path) -> None:
    entry = plaintext_entry(TOKEN)
    leases = [
        StoredLease(20001, entry.name, key_id(entry.stored_key), "0.0.0.0", 3, None),
        StoredLease(20002, "alice", key_id(b"x" * 32), "0.0.0.0", 7, 1.8e9 + 0.25),
    ]
    path = tmp_path / LEASES_FILE_NAME
    write_leases(path, leases)
    assert read_leases(path) == leases
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert TOKEN not in text
    assert entry.stored_key.hex() not in text
    assert entry.name in text  # a plain token is stored by its non-secret id
    assert [p.name for p in tmp_path.iterdir()] == [LEASES_FILE_NAME]  # no temporary left


def test_missing_file_is_no_leases(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert read_leases(tmp_path / LEASES_FILE_NAME) == []
    assert not caplog.records


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x00\xffnot json", "not JSON"),
        (b'{"version": 99, "leases": []}', "not a version 1 leases file"),
        (b'{"version": 1, "leases": {}}', "'leases' is not a list"),
        (b'{"version": 1, "leases": [{"port": 70000}]}', "lease field 'port'"),
        (
            b'{"version": 1, "leases": [{"port": 2000, "token": "a", "key": "k", '
            b'"host": "h", "tunnel": 1, "expires": "soon"}]}',
            "lease field 'expires'",
        ),
        (b'{"version": 1, "leases": [{"port": 20', "not JSON"),  # a torn write
    ],
)
def test_corrupt_file_is_set_aside_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, why: str
) -> None:
    path = tmp_path / LEASES_FILE_NAME
    path.write_bytes(content)
    with caplog.at_level(logging.INFO, logger="muxtunnel.leasestore"):
        assert read_leases(path) == []
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    assert "\n" not in message
    assert why in message
    assert "starting with no leases" in message
    assert not path.exists()
    (aside,) = tmp_path.glob(f"{LEASES_FILE_NAME}.corrupt-*")
    assert str(aside) in message
    assert aside.read_bytes() == content
    # The next write starts a fresh file.
    write_leases(path, [_lease(20001)])
    assert read_leases(path) == [_lease(20001)]


def test_unreadable_file_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / LEASES_FILE_NAME
    path.mkdir()  # EISDIR on read
    with caplog.at_level(logging.INFO, logger="muxtunnel.leasestore"):
        assert read_leases(path) == []
    (record,) = caplog.records
    assert "cannot read it" in record.getMessage()
    assert not path.exists()


def test_failed_write_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / LEASES_FILE_NAME
    old = [_lease(20001), _lease(20002, "bob")]
    write_leases(path, old)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_leases(path, [_lease(p) for p in range(21000, 21500)])
    monkeypatch.undo()
    assert read_leases(path) == old
    assert [p.name for p in tmp_path.iterdir()] == [LEASES_FILE_NAME]


def test_select_drops_expired_removed_rekeyed_and_moved() -> None:
    alice = key_id(b"k-alice")
    leases = [
        _lease(20001, expires=None),  # attached at the time of writing: kept
        _lease(20002, expires=2000.5),  # still running: kept
        _lease(20003, expires=1999.0),  # expired
        _lease(20004, "carol"),  # token no longer accepted
        _lease(20005)._replace(key=key_id(b"another key")),  # same name, new key
        _lease(20006)._replace(host="0.0.0.0"),  # the relay binds elsewhere now
        _lease(30000),  # outside the range
        _lease(20001, expires=2500.0),  # listed twice
    ]
    kept, dropped = select(
        leases,
        keys={"alice": alice},
        host="127.0.0.1",
        port_range=(20000, 20999),
        now=2000.0,
    )
    assert [lease.port for lease in kept] == [20001, 20002]
    assert dropped == {
        "expired": 1,
        "token removed": 2,
        "bind host changed": 1,
        "port outside the range": 1,
        "duplicate": 1,
    }


# -- the writer ----------------------------------------------------------------------------


async def test_a_burst_of_1000_changes_is_coalesced(tmp_path: Path) -> None:
    current: list[StoredLease] = []
    store = LeaseStore(tmp_path / LEASES_FILE_NAME, lambda: current)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run)
        for port in range(20000, 21000):
            current = [*current, _lease(port)]
            store.changed()
            if port % 100 == 0:
                await trio.lowlevel.checkpoint()  # BINDs arrive between other work
        with trio.fail_after(30):
            await store.wait_idle()
        nursery.cancel_scope.cancel()
    assert read_leases(store.path) == current
    assert store.writes <= 12  # 1000 changes, a handful of writes


async def test_the_event_loop_is_not_blocked_by_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1000 leases: the snapshot is taken in the loop (about a millisecond), the write and its
    fsync run in a thread: a disk that takes a second to sync does not stall the relay."""
    registry = PortRegistry((20000, 20999), "127.0.0.1", 60.0)
    owner = _Owner("alice")
    for port in range(20000, 21000):  # leases without listeners: only their records count
        registry.leases[port] = PortLease(port, "alice", 1, [], owner)
    keys = {"alice": key_id(b"k")}
    snapshot_times: list[float] = []

    def snapshot() -> list[StoredLease]:
        start = time.perf_counter()
        try:
            return registry.records(time.time(), keys)
        finally:
            snapshot_times.append(time.perf_counter() - start)

    for _ in range(5):
        snapshot()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.5)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    store = LeaseStore(tmp_path / LEASES_FILE_NAME, snapshot)
    gaps: list[float] = []
    done = trio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await trio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        start = time.perf_counter()
        assert await store.write()
        took = time.perf_counter() - start
        done.set()
    assert len(read_leases(store.path)) == 1000
    assert took >= 1.0  # two fsyncs (file and directory)
    assert max(gaps) < 0.5, max(gaps)  # generous on a shared machine; blocking would be >= 1 s
    assert sorted(snapshot_times)[3] < 0.05, snapshot_times


async def test_an_unwritable_state_dir_is_reported_once_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state dir should be")
    current = [_lease(20001)]
    store = LeaseStore(blocker / LEASES_FILE_NAME, lambda: current)
    with caplog.at_level(logging.INFO, logger="muxtunnel.leasestore"):
        await store.write()
        await store.write()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "kept in memory only" in warnings[0].getMessage()
        blocker.unlink()
        await store.write()
    assert read_leases(store.path) == current
    assert "written to" in caplog.records[-1].getMessage()


async def test_a_failed_write_is_tried_again_without_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leasestore, "WRITE_RETRY_SECONDS", 0.05)
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    current = [_lease(20001)]
    snapshots = 0

    def snapshot() -> list[StoredLease]:
        nonlocal snapshots
        snapshots += 1
        if snapshots == 2:
            blocker.unlink()  # the disk is fixed; no lease has changed since the first try
        return current

    store = LeaseStore(blocker / LEASES_FILE_NAME, snapshot)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run)
        store.changed()
        with trio.fail_after(20):
            await store.wait_idle()
        nursery.cancel_scope.cancel()
    assert snapshots == 2
    assert read_leases(store.path) == current


# -- the registry --------------------------------------------------------------------------


async def test_registry_restore_reserves_ports_for_their_token() -> None:
    lo, hi = free_port_range(3)
    clock = _Clock()
    first = PortRegistry((lo, hi), "127.0.0.1", 60.0, clock=clock)
    alice = _Owner("alice")
    keys = {"alice": "ka", "bob": "kb"}
    try:
        mine = await first.acquire(alice, 5, 0)
        held = (await first.acquire(alice, 6, 0)).port
        first.detach(mine, alice)
        clock.now += 20  # 40 s left on the detached one
        records = first.records(5000.0, keys)
    finally:
        first.close_all()
    assert {(r.port, r.token, r.tunnel_id, r.expires) for r in records} == {
        (mine.port, "alice", 5, 5040.0),
        (held, "alice", 6, None),
    }
    second = PortRegistry((lo, hi), "127.0.0.1", 30.0, clock=clock)
    changes: list[int] = []
    second.on_change = lambda: changes.append(1)
    try:
        assert await second.restore(records, 5000.0) == []
        assert changes
        # Capped at the (new) lease time; attached ones run a full lease from the load.
        assert second.leases[mine.port].expires_at == clock.now + 30.0
        assert second.leases[held].expires_at == clock.now + 30.0
        bob = _Owner("bob")
        with pytest.raises(BindError) as refused:
            await second.acquire(bob, 1, mine.port)
        assert refused.value.status == ResultStatus.ADDRESS_IN_USE
        assert str(refused.value) == f"port {mine.port} is reserved for another token for 30 s"
        free = (await second.acquire(bob, 1, 0)).port  # port 0 skips reserved ports
        assert free not in (mine.port, held)
        with pytest.raises(BindError, match="no free port"):
            await second.acquire(bob, 2, 0)
        # The owner's new session: the same port by tunnel id (port 0), or by number.
        back = _Owner("alice")
        assert (await second.acquire(back, 5, 0)).port == mine.port
        assert (await second.acquire(back, 6, held)).port == held
        # Expiry frees a reserved port that was not claimed.
        second.detach(second.leases[held], back)
        clock.now += 31
        second.expire()
        assert held not in second.leases
        assert (await second.acquire(bob, 3, held)).port == held
    finally:
        second.close_all()


async def test_restore_reports_ports_it_cannot_bind_again() -> None:
    lo, hi = free_port_range(3)
    registry = PortRegistry((lo, hi), "127.0.0.1", 60.0)
    squatter = trio.socket.socket()
    await squatter.bind(("127.0.0.1", lo))
    squatter.listen()
    try:
        failed = await registry.restore([_lease(lo), _lease(lo + 1)], time.time())
        assert len(failed) == 1
        assert failed[0].startswith(f"{lo}: ")
        assert set(registry.leases) == {lo + 1}
    finally:
        squatter.close()
        registry.close_all()


# -- the relay: load and reload ------------------------------------------------------------


def _relay(tmp_path: Path, tokens: tuple[str, ...], port_range: tuple[int, int]) -> _Relay:
    config = ServerConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        port_range=port_range,
        bind_host="127.0.0.1",
        tokens=tokens,
        state_dir=tmp_path / "relay",
    )
    identity = tls.load_or_create_identity(config.state_dir)
    return _Relay(config, tls.server_ssl_context(identity), DEFAULT_POLICY)


async def test_relay_load_drops_removed_tokens_and_reload_releases_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lo, hi = free_port_range(4)
    a, b = plaintext_entry(TOKEN), plaintext_entry(TOKEN_B)
    relay = _relay(tmp_path, (TOKEN, TOKEN_B), (lo, hi))
    path = relay.lease_store.path
    future = time.time() + 50
    write_leases(
        path,
        [
            StoredLease(lo, a.name, key_id(a.stored_key), "127.0.0.1", 1, future),
            StoredLease(lo + 1, b.name, key_id(b.stored_key), "127.0.0.1", 1, None),
            StoredLease(lo + 2, "gone", key_id(b"gone"), "127.0.0.1", 1, future),
            StoredLease(lo + 3, a.name, key_id(a.stored_key), "127.0.0.1", 2, time.time() - 1),
        ],
    )
    try:
        with caplog.at_level(logging.INFO, logger="muxtunnel.server"):
            await relay.restore_leases()
        (line,) = [r.getMessage() for r in caplog.records if "port leases" in r.getMessage()]
        assert line == (f"restored 2 port leases from {path}; dropped: 1 expired; 1 token removed")
        assert set(relay.registry.leases) == {lo, lo + 1}
        await relay.lease_store.write()
        assert {r.port for r in read_leases(path)} == {lo, lo + 1}
        # A reload that removes token B frees its port and drops it from the file.
        apply_reload(relay, replace(relay.config, tokens=(TOKEN,)))
        assert set(relay.registry.leases) == {lo}
        await relay.lease_store.write()
        assert [(r.port, r.token) for r in read_leases(path)] == [(lo, a.name)]
    finally:
        relay.registry.on_change = None
        relay.registry.close_all()
