"""The local admin endpoint (``GET /status``) and its client, used by ``muxtunnel status``.

The relay and the client each serve their :class:`~muxtunnel.stats.Stats` snapshot as JSON over
minimal HTTP/1.0 (so ``curl --unix-socket SOCK http://x/status`` works too). By default the
endpoint is a Unix socket in the state dir, in a ``admin/`` directory of mode 0700:
``admin/relay.sock`` for the relay, ``admin/client-<PID>.sock`` for each client, so a relay and
clients sharing one state dir never collide. The socket is made 0600 before ``listen`` (no
window where another user could connect) and removed on exit; a stale socket (no listener) in
its place is removed. A TCP address is used only when asked (``--admin HOST:PORT``).

Requests are bounded (:data:`MAX_REQUEST` bytes, :data:`READ_TIMEOUT` seconds, at most
:data:`MAX_CLIENTS` at once): hostile local input gets an error status, never a hang or a crash.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from muxtunnel._version import __version__
from muxtunnel.config import format_host_port, parse_host_port
from muxtunnel.errors import ConfigError, MuxtunnelError
from muxtunnel.localhttp import LocalEndpoint, response, route

if TYPE_CHECKING:
    from collections.abc import Mapping

    from muxtunnel.stats import Stats

__all__ = [
    "ADMIN_AUTO",
    "ADMIN_OFF",
    "AdminAddress",
    "AdminError",
    "StatusError",
    "admin_dir",
    "default_address",
    "discover",
    "parse_admin",
    "process_info",
    "query_status",
    "resolve_admin",
    "serve_admin",
]

logger = logging.getLogger(__name__)

#: ``--admin`` value for the default Unix socket in the state dir.
ADMIN_AUTO: Final = "auto"
#: ``--admin`` value that turns the endpoint off.
ADMIN_OFF: Final = "off"
#: Directory in the state dir holding the admin sockets.
ADMIN_DIR_NAME: Final = "admin"
#: Largest request head accepted (bytes); more gets 431.
MAX_REQUEST: Final = 4096
#: Seconds a connection may take to send its request; then 408.
READ_TIMEOUT: Final = 5.0
#: Admin connections served at once; more are closed at once.
MAX_CLIENTS: Final = 16
#: Longest Unix socket path the kernel accepts (``sun_path`` minus the NUL).
MAX_SOCKET_PATH: Final = 107
#: After an error answer, input read and dropped before closing (bytes, seconds).
LINGER_BYTES: Final = 65536
LINGER_TIME: Final = 1.0
#: Timeout of one status query (connect, request, answer).
QUERY_TIMEOUT: Final = 5.0
#: Largest status answer the client reads (bytes).
MAX_ANSWER: Final = 16 * 1024 * 1024


class AdminError(ConfigError):
    """The admin endpoint cannot be set up (one readable line)."""


class StatusError(MuxtunnelError):
    """An admin endpoint cannot be queried, or none is running (one readable line)."""


class StaleEndpointError(StatusError):
    """Nothing listens on the admin socket (a process that did not remove it)."""


@dataclass(frozen=True, slots=True)
class AdminAddress:
    """A Unix socket path, or a TCP host and port."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else format_host_port(self.host, self.port)


def parse_admin(value: str, what: str = "--admin") -> AdminAddress:
    """``PATH`` or ``HOST:PORT`` as an address: a value with ``/`` (or no ``:``) is a path.

    Raises:
        ConfigError: ``HOST:PORT`` with an invalid port, or an empty value.
    """
    text = value.strip()
    if not text:
        raise ConfigError(f"{what}: expected PATH, HOST:PORT or off")
    if "/" in text or ":" not in text:
        return AdminAddress(path=Path(text).expanduser())
    host, port = parse_host_port(text, what, allow_zero=True)
    return AdminAddress(host=host, port=port)


def admin_dir(state_dir: Path) -> Path:
    """The directory of the default admin sockets."""
    return state_dir / ADMIN_DIR_NAME


def default_address(state_dir: Path, role: str, pid: int | None = None) -> AdminAddress:
    """``<state-dir>/admin/relay.sock`` or ``<state-dir>/admin/client-<PID>.sock``."""
    name = "relay.sock" if role == "relay" else f"{role}-{os.getpid() if pid is None else pid}.sock"
    return AdminAddress(path=admin_dir(state_dir) / name)


def resolve_admin(value: str | None, state_dir: Path, role: str) -> AdminAddress | None:
    """The address ``--admin`` asks for (None: off); ``auto`` is the default socket."""
    if value is None or value == ADMIN_OFF:
        return None
    if value == ADMIN_AUTO:
        return default_address(state_dir, role)
    return parse_admin(value)


# --------------------------------------------------------------------------------------------
# server


def _is_live(path: Path) -> bool:
    """True if a process listens on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _remove_dead_clients(directory: Path) -> None:
    """Remove ``client-<PID>.sock`` files whose process no longer exists."""
    with contextlib.suppress(OSError):
        for entry in directory.glob("client-*.sock"):
            pid_text = entry.name[len("client-") : -len(".sock")]
            if not pid_text.isdigit():
                continue
            try:
                os.kill(int(pid_text), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    entry.unlink()
            except OSError:
                pass


def _bind_unix(path: Path, *, default: bool) -> tuple[socket.socket, os.stat_result]:
    """A listening Unix socket at ``path``, mode 0600 before ``listen``."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise AdminError(
            f"admin socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "pass a shorter --admin PATH (or --admin off)"
        )
    if default:
        try:
            path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.parent.mkdir(mode=0o700, exist_ok=True)
            os.chmod(path.parent, 0o700)
        except OSError as exc:
            raise AdminError(
                f"cannot create the admin directory {path.parent}: {exc.strerror or exc}"
            ) from None
        _remove_dead_clients(path.parent)
    if path.is_socket() or path.exists():
        if not path.is_socket():
            raise AdminError(f"admin socket {path}: a file that is not a socket is in the way")
        if _is_live(path):
            raise AdminError(
                f"admin socket {path} is in use by another running muxtunnel "
                "(pass --admin PATH or --admin off)"
            )
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale: nobody listens
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)  # before listen: nobody can connect yet
        sock.listen(MAX_CLIENTS)
        st = os.stat(path)
    except OSError as exc:
        sock.close()
        raise AdminError(f"cannot listen on admin socket {path}: {exc.strerror or exc}") from None
    return sock, st


async def serve_admin(
    address: AdminAddress,
    stats: Stats,
    info: Mapping[str, object] | None = None,
    *,
    default: bool = False,
    task_status: trio.TaskStatus[AdminAddress | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /status`` on ``address`` until cancelled (the socket file is removed then).

    ``info`` is added to every snapshot (e.g. the relay's listen address). ``default`` marks the
    state dir's own socket: its directory is created, and if the socket cannot be set up the
    process goes on without it (a warning; ``task_status.started`` gets None). Otherwise
    ``task_status.started`` gets the bound address (the real port for ``HOST:0``).

    Raises:
        AdminError: An address that was asked for cannot be set up.
    """
    extra = dict(info or {})
    path = address.path
    listeners: list[trio.SocketListener] = []
    st: os.stat_result | None = None
    if path is not None:
        try:
            raw, st = _bind_unix(path, default=default)
        except AdminError as exc:
            if not default:
                raise
            logger.warning(
                "no admin endpoint (muxtunnel status will not see this process): %s", exc
            )
            task_status.started(None)
            return
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(raw)))
        bound = address
    else:
        try:
            listeners = await trio.open_tcp_listeners(address.port, host=address.host or None)
        except OSError as exc:
            raise AdminError(
                f"cannot listen on admin address {address}: {exc.strerror or exc}"
            ) from None
        sockname = listeners[0].socket.getsockname()
        bound = AdminAddress(host=str(sockname[0]), port=int(sockname[1]))
    extra["admin"] = str(bound)
    endpoint = LocalEndpoint(
        name="admin endpoint",
        answer=partial(answer, stats=stats, extra=extra),
        error=_error,
        max_request=MAX_REQUEST,
        read_timeout=READ_TIMEOUT,
        max_clients=MAX_CLIENTS,
        linger_bytes=LINGER_BYTES,
        linger_time=LINGER_TIME,
    )
    try:
        async with trio.open_nursery() as nursery:
            endpoint.start(nursery, listeners)
            logger.debug("admin endpoint on %s", bound)
            task_status.started(bound)
    finally:
        for listener in listeners:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(listener)
        if path is not None and st is not None:
            _unlink_if_ours(path, st)


def _unlink_if_ours(path: Path, st: os.stat_result) -> None:
    """Remove the socket file unless another process has replaced it meanwhile."""
    with contextlib.suppress(OSError):
        now = os.stat(path)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            path.unlink()


def _error(code: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode() + b"\n"
    return response(code, body, "application/json")


def _count_tasks(task: trio.lowlevel.Task) -> int:
    """``task`` and every task below it in the nursery tree."""
    return 1 + sum(
        _count_tasks(child) for nursery in task.child_nurseries for child in nursery.child_tasks
    )


def process_info() -> dict[str, int | None]:
    """Resource use of this process: open file descriptors, trio tasks, resident memory.

    ``fds`` counts ``/proc/self/fd`` (None where there is no procfs), ``tasks`` every task of the
    running trio run (None outside one), ``rss`` is ``VmRSS`` in bytes (None where unknown).
    Leak checks compare these before and after a load.
    """
    fds: int | None
    try:
        fds = len(os.listdir("/proc/self/fd")) - 1  # minus the descriptor of the listing itself
    except OSError:
        fds = None
    tasks: int | None = None
    with contextlib.suppress(RuntimeError):
        root = trio.lowlevel.current_root_task()
        tasks = None if root is None else _count_tasks(root)
    rss: int | None = None
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    return {"fds": fds, "tasks": tasks, "rss": rss}


def answer(head: bytes, stats: Stats, extra: Mapping[str, object]) -> bytes:
    """The full HTTP response to request ``head`` (no I/O but reading this process's ``/proc`` figures)."""
    code, text = route(head, (b"/status", b"/"), "GET /status")
    if code != 200:
        return _error(code, text)
    snapshot: dict[str, Any] = stats.snapshot()
    snapshot.update(extra)
    snapshot["pid"] = os.getpid()
    snapshot["version"] = __version__
    snapshot["process"] = process_info()
    body = json.dumps(snapshot, indent=1).encode() + b"\n"
    return response(200, body, "application/json", head_only=text == "HEAD")


# --------------------------------------------------------------------------------------------
# client


def discover(state_dir: Path) -> list[AdminAddress]:
    """The admin sockets in ``state_dir``: the relay's first, then clients by PID."""
    directory = admin_dir(state_dir)
    try:
        found = [p for p in directory.iterdir() if p.name.endswith(".sock") and p.is_socket()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StatusError(f"cannot read {directory}: {exc.strerror or exc}") from None

    def order(p: Path) -> tuple[int, int, str]:
        pid = p.name[len("client-") : -len(".sock")]
        return (p.name != "relay.sock", int(pid) if pid.isdigit() else 0, p.name)

    return [AdminAddress(path=p) for p in sorted(found, key=order)]


async def query_status(address: AdminAddress) -> dict[str, Any]:
    """``GET /status`` from the endpoint at ``address``.

    Raises:
        StatusError: Nothing listens there, or the answer is not a status snapshot.
    """
    timeout = QUERY_TIMEOUT
    try:
        with trio.fail_after(timeout):
            if address.path is not None:
                stream = await trio.open_unix_socket(str(address.path))
            else:
                stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                await stream.send_all(b"GET /status HTTP/1.0\r\nHost: muxtunnel\r\n\r\n")
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if len(data) > MAX_ANSWER:
                        raise StatusError(f"{address}: answer too large")
    except trio.TooSlowError:
        raise StatusError(f"{address}: no answer within {timeout:g} s") from None
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            raise StaleEndpointError(f"{address}: nothing listens there (not running?)") from None
        raise StatusError(f"{address}: {exc.strerror or exc}") from None
    head, sep, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("ascii", "replace")
    if not sep or not status_line.startswith("HTTP/1.") or " 200 " not in f"{status_line} ":
        raise StatusError(f"{address}: not a muxtunnel admin endpoint ({status_line[:80]!r})")
    try:
        snapshot = json.loads(body)
    except ValueError:
        raise StatusError(f"{address}: the answer is not JSON") from None
    if not isinstance(snapshot, dict) or "sessions" not in snapshot:
        raise StatusError(f"{address}: the answer is not a muxtunnel status")
    return snapshot


# --------------------------------------------------------------------------------------------
# rendering (``muxtunnel status``)


def format_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 MiB`` ..."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    """``42s``, ``5m03s``, ``2h05m``, ``3d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _rtt_text(rtt: object) -> str:
    return f"{float(rtt) * 1000:.1f} ms" if isinstance(rtt, int | float) else "-"


def _counter_name(key: str) -> str:
    """``dial_failures:CONNECT_FAILED`` -> ``dial failures CONNECT_FAILED``."""
    kind, _, detail = key.partition(":")
    return f"{kind.replace('_', ' ')} {detail}".rstrip()


def status_tables(snapshot: Mapping[str, Any], *, boxed: bool, now: float) -> list[Any]:
    """Rich renderables for one endpoint's snapshot: a title line and the table."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    role = str(snapshot.get("role", "?"))
    where = snapshot.get("listen") or snapshot.get("relay") or ""
    title = Text(
        f"{role} {where}".rstrip()
        + f"  (pid {snapshot.get('pid', '?')}, up {format_age(float(snapshot.get('uptime', 0)))}"
        + f", admin {snapshot.get('admin', '?')})",
        style="bold",
    )
    table = Table(box=box.SIMPLE_HEAD if boxed else None, pad_edge=False, show_edge=False)
    for name, justify in (
        ("PEER", "left"),
        ("TOKEN", "left"),
        ("SINCE", "left"),
        ("RTT", "right"),
        ("PUBLIC", "left"),
        ("LOCAL", "left"),
        ("STATE", "left"),
        ("OPEN", "right"),
        ("TOTAL", "right"),
        ("IN", "right"),
        ("OUT", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for session in snapshot.get("sessions", []):
        since = float(session.get("since", now))
        connected = f"{format_age(now - since)} ago"
        if session.get("state", "up") != "up":  # a client between sessions
            connected = str(session["state"])
            if isinstance(session.get("retry_at"), int | float):
                connected += f" (retry in {format_age(float(session['retry_at']) - now)})"
        connections = session.get("connections", 1)
        peer = str(session.get("peer", "?"))
        if isinstance(connections, int) and connections > 1:
            peer += f" ({connections} connections)"
        head = [
            peer,
            str(session.get("token") or "-"),
            connected,
            _rtt_text(session.get("rtt")),
        ]
        tunnels = session.get("tunnels", [])
        if not tunnels:
            table.add_row(*head, "-", "", "", "", "", "", "")
        for i, tunnel in enumerate(tunnels):
            state = str(tunnel.get("state", "?"))
            if tunnel.get("last_error") and state != "up":
                state += f" ({tunnel['last_error']})"
            table.add_row(
                *(head if i == 0 else ["", "", "", ""]),
                str(tunnel.get("public", "?")),
                str(tunnel.get("local") or "-"),
                state,
                str(tunnel.get("open", 0)),
                str(tunnel.get("total", 0)),
                format_bytes(int(tunnel.get("bytes_in", 0))),
                format_bytes(int(tunnel.get("bytes_out", 0))),
            )
    totals = snapshot.get("totals", {})
    table.add_section()
    table.add_row(
        f"total: {totals.get('sessions', 0)} sessions",
        "",
        "",
        "",
        f"{totals.get('tunnels', 0)} tunnels",
        "",
        "",
        str(totals.get("streams_open", 0)),
        str(totals.get("streams_total", 0)),
        format_bytes(int(totals.get("bytes_in", 0))),
        format_bytes(int(totals.get("bytes_out", 0))),
        style="bold",
    )
    out: list[Any] = [title, table]
    counters = {k: v for k, v in snapshot.get("counters", {}).items() if k != "sessions_total"}
    if totals.get("refused"):
        counters["refused"] = totals["refused"]
    if counters:
        out.append(Text(", ".join(f"{_counter_name(k)}: {v}" for k, v in counters.items())))
    return out


async def query_all(
    addresses: list[AdminAddress],
) -> tuple[list[dict[str, Any]], list[StatusError]]:
    """Query every address at once: the snapshots (in order) and the errors."""
    results: list[dict[str, Any] | StatusError | None] = [None] * len(addresses)

    async def one(i: int, address: AdminAddress) -> None:
        try:
            results[i] = await query_status(address)
        except StatusError as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i, address in enumerate(addresses):
            nursery.start_soon(one, i, address)
    snapshots = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if isinstance(r, StatusError)]
    return snapshots, errors


def print_status(snapshots: list[dict[str, Any]]) -> None:
    """Print the status tables to stdout: boxed on a terminal, plain columns otherwise."""
    import sys
    import time

    from rich.console import Console

    tty = sys.stdout.isatty()
    console = Console(width=None if tty else 200, soft_wrap=not tty)
    now = time.time()
    for i, snapshot in enumerate(snapshots):
        if i:
            console.print()
        for renderable in status_tables(snapshot, boxed=tty, now=now):
            console.print(renderable)
