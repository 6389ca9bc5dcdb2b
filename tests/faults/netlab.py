"""A small network lab for fault tests: hosts in network namespaces around one router.

API (synchronous; needs root, ``ip``, ``nft``, and ``gcc`` for delayed links)::

    with Lab(workdir) as lab:                  # or the ``lab`` fixture (tests/faults/conftest.py)
        relay = lab.host("relay")              # a namespace "mxl<suffix>relay" linked to the router
        client = lab.host("client", delay_ms=50, jitter_ms=10)   # one-way delay each direction
        relay.addr                             # "10.77.<n>.2", reachable from every other host
        proc = relay.start("relay", [*cmd])    # ManagedProcess running inside the namespace
        relay.run(["ss", "-tn"])               # CompletedProcess (bounded wait, no check)
        client.link.cut(); client.link.restore()          # ip link set down / up (router side)
        client.link.cut(silent=True)           # or: the router drops everything, no ICMP
        client.link.set_loss(2.0); client.link.clear_loss()  # nftables numgen drop, both directions
        lab.start_relay(relay, token=...) -> LabRelay;  lab.start_client(client, relay, specs)
        svc = service.serve(9000)              # tests/faults/peers.py: a service that checks bytes
        v = visitor.visit(relay.addr, port, "down", size, seed); visit_result(v) -> dict
        t = build_tunnel(lab)                  # hosts relay/client/service/visitor, one tunnel up
        t.visit("echo", size, seed, rate=...); t.check_logs(); record("name", figure=value)

Topology: every host has one link to a router namespace (10.77.<n>.0/24: router .1, host .2,
default route via the router). A plain link is a veth pair; a link with ``delay_ms`` is a pair
of TUN devices joined by ``benchmarks/tools/netdelay.c`` (compiled with gcc into the lab's
work directory at run time; there is no ``tc netem`` on every kernel). ``cut()`` takes the
router's end down (the host loses carrier; the router answers for it with ICMP unreachable);
``cut(silent=True)`` drops everything in the router instead (a black hole mid-path). Loss is
an nftables table in the router that drops ``percent`` % of the packets forwarded to or from
that link.

Names carry a per-run suffix, so parallel runs never collide. Every namespace (and with it
every veth, TUN device and nftables table inside it) and every process started here is removed
by :meth:`Lab.close` (called by ``with``, the fixture's finally, and atexit; while a lab is
open, SIGTERM exits through them too). Processes are stopped by PID only (SIGTERM, then
SIGKILL).

:func:`unavailable_reason` says why the lab cannot run here (None when it can).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from tests.system.harness import (
    REPO_ROOT,
    Forward,
    HarnessError,
    ManagedProcess,
    ProcessGroup,
    muxtunnel_command,
    muxtunnel_env,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "NETDELAY_SOURCE",
    "PEERS_SCRIPT",
    "Host",
    "Lab",
    "LabClient",
    "LabError",
    "LabRelay",
    "Link",
    "Tunnel",
    "build_tunnel",
    "record",
    "unavailable_reason",
    "visit_result",
]

#: The userspace delay line (compiled at run time).
NETDELAY_SOURCE = REPO_ROOT / "benchmarks" / "tools" / "netdelay.c"
#: The traffic tool run on service and visitor hosts (see its docstring).
PEERS_SCRIPT = Path(__file__).resolve().parent / "peers.py"

_LISTEN_RE = re.compile(r"muxtunnel relay listening on (?P<host>\[[^\]]+\]|[^\s:]+):(?P<port>\d+)")
_FINGERPRINT_RE = re.compile(r"fingerprint: (?P<fp>sha256:[0-9a-f]{64})\b")
_FORWARD_RE = re.compile(
    r"forwarding tcp://(?P<host>\[[^\]]+\]|[^\s:]+):(?P<port>\d+) -> (?P<local>\S+)"
)


_INTERNAL = re.compile(r"internal error|Traceback \(most recent call last\)")


class LabError(HarnessError):
    """A lab command failed (message includes its output)."""


def unavailable_reason(*, need_delay: bool = True) -> str | None:
    """None if the lab can run here, else why not (one line)."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (Debian: apt-get install iproute2 nftables)"
    if need_delay:
        if shutil.which("gcc") is None:
            return "gcc not found (needed to build benchmarks/tools/netdelay.c)"
        if not Path("/dev/net/tun").exists():
            return "/dev/net/tun missing (needed by netdelay)"
    return None


def _run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30.0) -> str:
    r = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=timeout
    )
    if r.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


@dataclass
class Link:
    """A host's link to the router: cut/restore it, add/remove loss."""

    lab: Lab
    index: int
    host_dev: str
    router_dev: str
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    is_cut: bool = False
    loss_percent: float = 0.0
    _table: str = ""
    _silent: bool = False

    @property
    def subnet(self) -> str:
        """``10.77.<n>``: the router is ``.1`` and the host ``.2``."""
        return f"10.77.{self.index}"

    def cut(self, *, silent: bool = False) -> float:
        """Cut the link: nothing passes either way. Returns ``time.monotonic()``.

        Default: the router's end goes down (``ip link set down``): the host loses carrier, and
        the router answers the other hosts' packets for it with ICMP unreachable. ``silent``:
        the router drops every packet to or from the link without a word (nftables), like an
        outage in the middle of a path: no carrier change, no ICMP.
        """
        if silent:
            script = (
                f"table inet mxcut{self.index} {{\n"
                "  chain blackhole { type filter hook forward priority -5; policy accept;\n"
                f'    iifname "{self.router_dev}" drop\n'
                f'    oifname "{self.router_dev}" drop\n'
                "  }\n}\n"
            )
            _run(["ip", "netns", "exec", self.lab.router_ns, "nft", "-f", "-"], stdin=script)
        else:
            _run(["ip", "-n", self.lab.router_ns, "link", "set", self.router_dev, "down"])
        self.is_cut = True
        self._silent = silent
        return time.monotonic()

    def restore(self) -> float:
        """Undo :meth:`cut`. Returns ``time.monotonic()``."""
        if self._silent:
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.lab.router_ns,
                    "nft",
                    "delete",
                    "table",
                    "inet",
                    f"mxcut{self.index}",
                ]
            )
        else:
            _run(["ip", "-n", self.lab.router_ns, "link", "set", self.router_dev, "up"])
        self.is_cut = False
        return time.monotonic()

    def set_loss(self, percent: float) -> None:
        """Drop ``percent`` % of the packets the router forwards to or from this link."""
        self.clear_loss()
        n = round(percent * 100)
        self._table = f"mxloss{self.index}"
        script = (
            f"table inet {self._table} {{\n"
            "  chain lossy { type filter hook forward priority 0; policy accept;\n"
            f'    iifname "{self.router_dev}" numgen random mod 10000 lt {n} drop\n'
            f'    oifname "{self.router_dev}" numgen random mod 10000 lt {n} drop\n'
            "  }\n}\n"
        )
        _run(["ip", "netns", "exec", self.lab.router_ns, "nft", "-f", "-"], stdin=script)
        self.loss_percent = percent

    def clear_loss(self) -> None:
        """Remove the loss rule (idempotent)."""
        if self._table:
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.lab.router_ns,
                    "nft",
                    "delete",
                    "table",
                    "inet",
                    self._table,
                ],
                capture_output=True,
                check=False,
            )
            self._table = ""
        self.loss_percent = 0.0


@dataclass
class Host:
    """One namespace with one link to the router."""

    lab: Lab
    name: str
    ns: str
    link: Link

    @property
    def addr(self) -> str:
        """This host's address (reachable from every other host through the router)."""
        return f"{self.link.subnet}.2"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this namespace (``ip netns exec`` execs, same PID)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` inside this namespace; the lab stops it at close (by PID)."""
        return self.lab.procs.start(
            f"{self.name}:{name}",
            self.argv(argv),
            env=env or self.lab.env,
            cwd=cwd or self.lab.workdir,
        )

    def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this namespace to completion (bounded by ``timeout``)."""
        return subprocess.run(
            self.argv(argv),
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=self.lab.env,
            cwd=self.lab.workdir,
        )

    def peers(self, name: str, args: Sequence[str]) -> ManagedProcess:
        """Start ``python tests/faults/peers.py ARGS`` (the traffic tool) inside this namespace."""
        return self.start(name, [sys.executable, "-u", str(PEERS_SCRIPT), *args])

    def serve(self, port: int = 9000, *, name: str = "service") -> ManagedProcess:
        """Start the checking service (``peers.py serve``) on ``port``; wait until it listens."""
        proc = self.peers(name, ["serve", str(port)])
        proc.wait_for_line(re.compile(r"^listening"), timeout=30)
        return proc

    def visit(
        self,
        target: str,
        port: int,
        mode: str,
        size: int,
        seed: int,
        *,
        rate: float = 0.0,
        timeout: float = 120.0,
        name: str = "visitor",
    ) -> ManagedProcess:
        """Start one visitor (``peers.py visit``); read its outcome with :func:`visit_result`."""
        args = ["visit", target, str(port), mode, str(size), str(seed), "--timeout", str(timeout)]
        if rate > 0:
            args += ["--rate", str(rate)]
        return self.peers(name, args)

    def probe(
        self, target: str, port: int, *, count: int = 5, timeout: float = 2.0
    ) -> dict[str, Any]:
        """``count`` TCP connects to ``target:port`` from this host (``peers.py probe``)."""
        args = [sys.executable, str(PEERS_SCRIPT), "probe", target, str(port)]
        r = self.run([*args, "--count", str(count), "--timeout", str(timeout)])
        if r.returncode != 0:
            raise LabError(f"probe from {self.name}: {r.stderr.strip()}")
        out: dict[str, Any] = json.loads(r.stdout)
        return out


@dataclass
class Tunnel:
    """The usual four hosts: relay, client, local service and visitors, one tunnel up."""

    lab: Lab
    relay_host: Host
    client_host: Host
    service_host: Host
    visitor_host: Host
    relay: LabRelay
    client: LabClient
    service: ManagedProcess
    #: The tunnel's public port on the relay host.
    port: int
    service_port: int = 9000

    def visit(self, mode: str, size: int, seed: int, **kw: Any) -> ManagedProcess:
        """A visitor on the visitor host through the tunnel (see :meth:`Host.visit`)."""
        return self.visitor_host.visit(self.relay_host.addr, self.port, mode, size, seed, **kw)

    def check_logs(self) -> None:
        """Fail if a muxtunnel process of the lab logged an internal error or a traceback."""
        for proc in self.lab.procs.processes:
            bad = [line for line in proc.stderr_lines if _INTERNAL.search(line)]
            assert not bad, f"{proc.name} logged an internal error: {bad[:3]}\n{proc.describe()}"


def build_tunnel(
    lab: Lab,
    *,
    token: str | None = None,
    client_delay_ms: float = 0.0,
    client_jitter_ms: float = 0.0,
    relay_args: Sequence[str] = (),
    client_args: Sequence[str] = (),
) -> Tunnel:
    """Hosts relay/client/service/visitor, a relay, the checking service, a client exposing it.

    ``client_delay_ms``/``client_jitter_ms`` put the delay line on the client's link (one way,
    each direction: RTT = 2 x delay).
    """
    relay_host = lab.host("relay")
    client_host = lab.host("client", delay_ms=client_delay_ms, jitter_ms=client_jitter_ms)
    service_host = lab.host("service")
    visitor_host = lab.host("visitor")
    relay = lab.start_relay(
        relay_host, token=token or secrets.token_urlsafe(24), extra_args=relay_args
    )
    service = service_host.serve(9000)
    client = lab.start_client(
        client_host, relay, [f"{service_host.addr}:9000"], extra_args=client_args
    )
    (fwd,) = client.forwards
    return Tunnel(
        lab, relay_host, client_host, service_host, visitor_host, relay, client, service, fwd.port
    )


def record(name: str, **figures: object) -> None:
    """Print one fault's measured figures; with ``$MUXTUNNEL_FAULT_REPORT`` also append JSON."""
    line = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"FAULT {name}: {line}")
    path = os.environ.get("MUXTUNNEL_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"fault": name, **figures}) + "\n")


def visit_result(proc: ManagedProcess, timeout: float = 180.0) -> dict[str, Any]:
    """Wait for a visitor process's JSON outcome (see tests/faults/peers.py)."""
    match, _ = proc.wait_for_line(re.compile(r"^\{.*\}$"), timeout=timeout, what="its JSON result")
    out: dict[str, Any] = json.loads(match.group(0))
    return out


@dataclass
class LabRelay:
    """A ``muxtunnel server`` running on a lab host."""

    proc: ManagedProcess
    host: Host
    port: int
    fingerprint: str
    port_range: tuple[int, int]
    state_dir: Path
    token: str

    @property
    def address(self) -> str:
        """``HOST:PORT`` for a client's ``--server``."""
        return f"{self.host.addr}:{self.port}"


@dataclass
class LabClient:
    """A ``muxtunnel client`` running on a lab host."""

    proc: ManagedProcess
    host: Host
    forwards: list[Forward] = field(default_factory=list)

    def wait_forwards(
        self, count: int, *, start: int = 0, timeout: float = 30.0
    ) -> tuple[list[Forward], int]:
        """Wait for ``count`` ``forwarding`` lines at stdout index >= ``start``."""
        found: list[Forward] = []
        index = start
        for _ in range(count):
            match, at = self.proc.wait_for_line(
                _FORWARD_RE, timeout=timeout, start=index, what="'forwarding tcp://...'"
            )
            found.append(
                Forward(match.group("host").strip("[]"), int(match.group("port")), match["local"])
            )
            index = at + 1
        return found, index


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


class Lab:
    """Hosts (namespaces) around a router namespace; everything is removed by :meth:`close`."""

    def __init__(self, workdir: Path, *, max_seconds: float = 1800.0) -> None:
        self.workdir = workdir
        self.suffix = secrets.token_hex(3)
        self.router_ns = f"mxl{self.suffix}r"
        self.max_seconds = max_seconds
        self.procs = ProcessGroup()
        self.hosts: dict[str, Host] = {}
        self.env = muxtunnel_env(workdir)
        self._namespaces: list[str] = []
        self._netdelay: Path | None = None
        self._closed = False
        atexit.register(self.close)
        # SIGTERM (a CI timeout, ``timeout``) would end Python without atexit: make it an
        # exit that runs the finally blocks and atexit, unless someone handles it already.
        self._old_sigterm: Any = None
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            self._old_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._add_ns(self.router_ns)
            forward = "echo 1 > /proc/sys/net/ipv4/ip_forward"  # /proc/sys/net is per namespace
            _run(["ip", "netns", "exec", self.router_ns, "sh", "-c", forward])
        except BaseException:
            self.close()
            raise

    # -- building ------------------------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _netdelay_binary(self) -> Path:
        if self._netdelay is None:
            binary = self.workdir / f"netdelay-{self.suffix}"
            _run(["gcc", "-O2", "-o", str(binary), str(NETDELAY_SOURCE)], timeout=120)
            self._netdelay = binary
        return self._netdelay

    def host(self, name: str, *, delay_ms: float = 0.0, jitter_ms: float = 0.0) -> Host:
        """Create host ``name`` linked to the router (``delay_ms`` one way, each direction)."""
        if name in self.hosts:
            raise LabError(f"host {name!r} exists")
        index = len(self.hosts) + 1
        ns = f"mxl{self.suffix}{name}"[:30]
        self._add_ns(ns)
        link = Link(
            self, index, f"h{self.suffix}{index}", f"r{self.suffix}{index}", delay_ms, jitter_ms
        )
        sub = link.subnet
        if delay_ms > 0 or jitter_ms > 0:
            binary = self._netdelay_binary()
            args = [str(binary), ns, link.host_dev, self.router_ns, link.router_dev]
            args += [str(delay_ms), "0", "50", str(int(self.max_seconds)), str(jitter_ms)]
            proc = self.procs.start(f"netdelay-{name}", args, cwd=self.workdir)
            proc.wait_for_line(re.compile(r"^ready"), timeout=20)
            _run(
                [
                    "ip",
                    "-n",
                    ns,
                    "addr",
                    "add",
                    f"{sub}.2",
                    "peer",
                    f"{sub}.1",
                    "dev",
                    link.host_dev,
                ]
            )
            _run(["ip", "-n", ns, "link", "set", link.host_dev, "up"])
            _run(["ip", "-n", ns, "route", "add", "default", "dev", link.host_dev])
            _run(
                [
                    "ip",
                    "-n",
                    self.router_ns,
                    "addr",
                    "add",
                    f"{sub}.1",
                    "peer",
                    f"{sub}.2",
                    "dev",
                    link.router_dev,
                ]
            )
            _run(["ip", "-n", self.router_ns, "link", "set", link.router_dev, "up"])
        else:
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    link.host_dev,
                    "netns",
                    ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    link.router_dev,
                    "netns",
                    self.router_ns,
                ]
            )
            _run(["ip", "-n", ns, "addr", "add", f"{sub}.2/24", "dev", link.host_dev])
            _run(["ip", "-n", ns, "link", "set", link.host_dev, "up"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", f"{sub}.1"])
            _run(["ip", "-n", self.router_ns, "addr", "add", f"{sub}.1/24", "dev", link.router_dev])
            _run(["ip", "-n", self.router_ns, "link", "set", link.router_dev, "up"])
        host = Host(self, name, ns, link)
        self.hosts[name] = host
        return host

    # -- muxtunnel processes -------------------------------------------------------------

    def start_relay(
        self,
        host: Host,
        *,
        token: str,
        port: int = 7835,
        port_range: tuple[int, int] = (20000, 20015),
        state_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        name: str = "relay",
        timeout: float = 30.0,
    ) -> LabRelay:
        """Start ``muxtunnel server`` on ``host`` (public ports on every address of the host)."""
        state_dir = state_dir or self.workdir / f"{name}-state"
        state_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            *muxtunnel_command(),
            "server",
            "--listen",
            f"{host.addr}:{port}",
            "--ports",
            f"{port_range[0]}-{port_range[1]}",
            "--bind",
            "0.0.0.0",
            "--state-dir",
            str(state_dir),
            "--token",
            token,
            *extra_args,
        ]
        proc = host.start(name, argv)
        fp, _ = proc.wait_for_line(_FINGERPRINT_RE, timeout=timeout, what="the fingerprint line")
        proc.wait_for_line(_LISTEN_RE, timeout=timeout, what="the listening line")
        return LabRelay(proc, host, port, fp["fp"], port_range, state_dir, token)

    def start_client(
        self,
        host: Host,
        relay: LabRelay,
        specs: Sequence[str],
        *,
        extra_args: Sequence[str] = (),
        name: str = "client",
        expect_forwards: int | None = None,
        timeout: float = 30.0,
    ) -> LabClient:
        """Start ``muxtunnel client`` on ``host`` (pinned to ``relay``) and wait for its tunnels."""
        state_dir = self.workdir / f"{name}-state"
        state_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            *muxtunnel_command(),
            "client",
            "--server",
            relay.address,
            "--token",
            relay.token,
            "--fingerprint",
            relay.fingerprint,
            "--state-dir",
            str(state_dir),
            *extra_args,
            *specs,
        ]
        client = LabClient(host.start(name, argv), host)
        count = len(specs) if expect_forwards is None else expect_forwards
        if count:
            client.forwards, _ = client.wait_forwards(count, timeout=timeout)
        return client

    # -- teardown ------------------------------------------------------------------------

    def describe(self) -> str:
        """Output of every process the lab started."""
        return self.procs.describe()

    def close(self) -> None:
        """Stop every process (by PID), delete every namespace; idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.procs.close()
        for host in self.hosts.values():
            host.link.clear_loss()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._namespaces.clear()
        if self._netdelay is not None:
            with contextlib.suppress(OSError):
                self._netdelay.unlink()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self._old_sigterm is not None:
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGTERM, self._old_sigterm)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
