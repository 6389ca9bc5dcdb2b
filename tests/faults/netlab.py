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
        client.move()                          # a new link and address; the old one goes away
        lab.lan(client, service)               # a direct link between two hosts (no router)
        sshd = service.start_sshd(2222)        # a throwaway OpenSSH server; sshd.ssh_argv(...)
        rss_bytes(proc.pid); status_json(state_dir)        # memory; ``muxtunnel status --json``
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
import pwd
import re
import secrets
import shutil
import signal
import socket
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
    from collections.abc import Callable, Sequence

__all__ = [
    "NETDELAY_SOURCE",
    "PEERS_SCRIPT",
    "Host",
    "Lab",
    "LabClient",
    "LabError",
    "LabRelay",
    "LabSshd",
    "Link",
    "Tunnel",
    "build_tunnel",
    "record",
    "rss_bytes",
    "status_json",
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
    #: Links this host had before :meth:`move` (down, address deleted).
    old_links: list[Link] = field(default_factory=list)

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

    def move(self, *, close_sockets: bool = False) -> Link:
        """Move this host to a new link and address (a roaming client); returns the new link.

        A new veth pair to the router (a new subnet) comes up and becomes the default route;
        the old link's address is deleted and both of its ends go down, so connections bound
        to the old address are dead (their packets can no longer leave, answers find no one).
        ``close_sockets``: also abort those TCP connections (``ss -K``, as a mobile OS does when
        it leaves a network): their owners get an error at once, the peers hear nothing.
        Only for hosts on plain (undelayed) links.
        """
        old = self.link
        if old.delay_ms > 0 or old.jitter_ms > 0:
            raise LabError("move() needs a plain link (no delay line)")
        link = self.lab._veth(self.ns)
        sub = link.subnet
        _run(["ip", "-n", self.ns, "route", "replace", "default", "via", f"{sub}.1"])
        _run(["ip", "-n", self.ns, "addr", "del", f"{old.subnet}.2/24", "dev", old.host_dev])
        _run(["ip", "-n", self.ns, "link", "set", old.host_dev, "down"])
        _run(["ip", "-n", self.lab.router_ns, "link", "set", old.router_dev, "down"])
        if close_sockets:
            _run(self.argv(["ss", "-K", "-t", "src", f"{old.subnet}.2"]))
        old.clear_loss()
        self.old_links.append(old)
        self.link = link
        return link

    def start_sshd(self, port: int = 2222, *, timeout: float = 30.0) -> LabSshd:
        """A throwaway OpenSSH server on ``0.0.0.0:port`` in this namespace (own keys, config)."""
        sshd = _find_sshd()
        if sshd is None:
            raise LabError("sshd not installed")
        home = self.lab.workdir / f"sshd-{self.name}"
        home.mkdir(parents=True, exist_ok=True)
        host_key, user_key = home / "ssh_host_ed25519_key", home / "id_ed25519"
        for key, comment in ((host_key, "muxtunnel-lab-host"), (user_key, "muxtunnel-lab-user")):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), "-C", comment])
        authorized = home / "authorized_keys"
        shutil.copyfile(user_key.with_suffix(".pub"), authorized)
        authorized.chmod(0o600)
        known_hosts = home / "known_hosts"
        known_hosts.touch()
        config = home / "sshd_config"
        options = [
            f"Port {port}",
            "ListenAddress 0.0.0.0",
            f"HostKey {host_key}",
            f"PidFile {home / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized}",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AllowTcpForwarding no",
            "X11Forwarding no",
            "PrintMotd no",
            "UseDNS no",
            "ClientAliveInterval 0",
            "LogLevel INFO",
        ]
        config.write_text("\n".join(options) + "\n")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        _run([sshd, "-t", "-f", str(config)])
        # Its session processes inherit its stdout and stderr: they go to a file, not to the
        # harness's pipes (whose readers would wait for every session to end).
        log = home / "sshd.log"
        script = 'exec "$0" -D -e -f "$1" >>"$2" 2>&1'
        proc = self.start("sshd", ["sh", "-c", script, sshd, str(config), str(log)])
        user = pwd.getpwuid(os.getuid()).pw_name
        server = LabSshd(proc, self, port, user, user_key, known_hosts, log)
        self.lab.cleanups.append(server.close)
        deadline = time.monotonic() + timeout
        while "Server listening on 0.0.0.0" not in server.log_text():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise LabError(f"sshd did not start:\n{server.log_text()}\n{proc.describe()}")
            time.sleep(0.05)
        return server

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

    def public_port(self, service_port: int) -> int:
        """The public port of the tunnel to ``service_port`` on the service host."""
        (fwd,) = [f for f in self.client.forwards if f.local.endswith(f":{service_port}")]
        return fwd.port

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
    extra_ports: Sequence[int] = (),
    service_lan: bool = False,
) -> Tunnel:
    """Hosts relay/client/service/visitor, a relay, the checking service, a client exposing it.

    ``client_delay_ms``/``client_jitter_ms`` put the delay line on the client's link (one way,
    each direction: RTT = 2 x delay). ``extra_ports``: more service-host ports the client
    exposes (:meth:`Tunnel.public_port` finds their public ports). ``service_lan``: the client
    reaches the service over a direct link (:meth:`Lab.lan`), so a cut or a move of the client's
    router link leaves only the client↔relay path broken.
    """
    relay_host = lab.host("relay")
    client_host = lab.host("client", delay_ms=client_delay_ms, jitter_ms=client_jitter_ms)
    service_host = lab.host("service")
    visitor_host = lab.host("visitor")
    relay = lab.start_relay(
        relay_host, token=token or secrets.token_urlsafe(24), extra_args=relay_args
    )
    service = service_host.serve(9000)
    service_addr = lab.lan(client_host, service_host)[1] if service_lan else service_host.addr
    specs = [f"{service_addr}:{p}" for p in (9000, *extra_ports)]
    client = lab.start_client(client_host, relay, specs, extra_args=client_args)
    (fwd,) = [f for f in client.forwards if f.local.endswith(":9000")]
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


def _find_sshd() -> str | None:
    for path in ("/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("sshd")


@dataclass
class LabSshd:
    """An OpenSSH server started by :meth:`Host.start_sshd`."""

    proc: ManagedProcess
    host: Host
    port: int
    user: str
    user_key: Path
    known_hosts: Path
    log: Path

    def log_text(self) -> str:
        """What sshd logged so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Stop sshd and the session processes it started (by PID; idempotent)."""
        for pid in reversed(_descendants(self.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.close()

    def ssh_argv(self, target: str, port: int, *remote: str) -> list[str]:
        """An ``ssh`` command to ``target:port`` that reads no system or user configuration."""
        return [
            "ssh", "-F", "/dev/null", "-T",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "ControlMaster=no",
            "-o", "ControlPath=none",
            "-o", "Compression=no",
            "-o", "ConnectTimeout=15",
            "-o", "ServerAliveInterval=0",
            "-o", "LogLevel=ERROR",
            "-i", str(self.user_key),
            "-p", str(port),
            f"{self.user}@{target}",
            *remote,
        ]  # fmt: skip


def _descendants(pid: int) -> list[int]:
    """PIDs of the processes below ``pid`` (children before grandchildren)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(0), [])
        found += children
        todo += children
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory (``VmRSS``) of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LabError(f"no VmRSS for pid {pid}")


def status_json(state_dir: Path, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The status snapshots of the processes of ``state_dir`` (what ``muxtunnel status --json``
    shows): ``GET /status`` on each admin socket in ``<state-dir>/admin`` that answers."""
    snapshots: list[dict[str, Any]] = []
    for path in sorted((state_dir / "admin").glob("*.sock")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                continue  # a process that is gone
            sock.sendall(b"GET /status HTTP/1.0\r\nHost: lab\r\n\r\n")
            answer = bytearray()
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = bytes(answer).partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise LabError(f"{path}: {head.decode(errors='replace')}")
        snapshots.append(json.loads(body))
    return snapshots


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
    state_dir: Path | None = None

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
        self._links = 0
        #: Called first by :meth:`close` (e.g. :meth:`LabSshd.close`).
        self.cleanups: list[Callable[[], None]] = []
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
        self._links += 1
        index = self._links
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

    def _veth(self, ns: str) -> Link:
        """A new plain link (veth pair, next subnet) from namespace ``ns`` to the router, up."""
        self._links += 1
        index = self._links
        link = Link(self, index, f"h{self.suffix}{index}", f"r{self.suffix}{index}")
        sub = link.subnet
        veth = ["type", "veth", "peer", "name", link.router_dev, "netns", self.router_ns]
        _run(["ip", "link", "add", link.host_dev, "netns", ns, *veth])
        _run(["ip", "-n", ns, "addr", "add", f"{sub}.2/24", "dev", link.host_dev])
        _run(["ip", "-n", ns, "link", "set", link.host_dev, "up"])
        _run(["ip", "-n", self.router_ns, "addr", "add", f"{sub}.1/24", "dev", link.router_dev])
        _run(["ip", "-n", self.router_ns, "link", "set", link.router_dev, "up"])
        return link

    def lan(self, a: Host, b: Host) -> tuple[str, str]:
        """A direct link between hosts ``a`` and ``b`` (not through the router: cuts and moves
        of their router links leave it alone); returns their addresses on it (10.78.<n>.1, .2).
        """
        self._links += 1
        index = self._links
        dev_a, dev_b = f"l{self.suffix}{index}a", f"l{self.suffix}{index}b"
        peer = ["peer", "name", dev_b, "netns", b.ns]
        _run(["ip", "link", "add", dev_a, "netns", a.ns, "type", "veth", *peer])
        addrs = (f"10.78.{index}.1", f"10.78.{index}.2")
        for ns, dev, addr in ((a.ns, dev_a, addrs[0]), (b.ns, dev_b, addrs[1])):
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        return addrs

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
        client = LabClient(host.start(name, argv), host, state_dir=state_dir)
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
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
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
