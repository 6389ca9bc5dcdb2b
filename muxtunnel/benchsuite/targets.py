"""The things being measured: direct TCP, muxtunnel, OpenSSH ``ssh -N -R``, and the bare relay of
:mod:`muxtunnel.benchsuite.ceiling` (what Python + trio can do here at best, in the same run)."""

from __future__ import annotations

import getpass
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from muxtunnel.benchsuite.procs import (
    BenchError,
    Child,
    python,
    reference_tree,
    sched_times,
    tree_rss,
)

SSHD = "/usr/sbin/sshd"
#: The client's log line for each extra connection that joined its session.
_JOINED = re.compile(r"connection (\d+) to relay \S+ joined the session")
AES128 = "aes128-gcm@openssh.com"


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things run. Loopback: everything in the current namespace on 127.0.0.1.

    Network path: the relay (and the visitors) in *relay_ns*, the tunnel client and the service
    in *edge_ns*; only the tunnel's own connection (or direct TCP) crosses the delay line.
    """

    relay_ns: str | None = None
    edge_ns: str | None = None
    relay_addr: str = "127.0.0.1"  # where tunnel clients reach the relay / sshd
    edge_addr: str = "127.0.0.1"  # where direct visitors reach the service

    @property
    def remote(self) -> bool:
        return self.relay_ns is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on *host* in this namespace."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def pick_port(layout: Layout) -> int:
    """A port to listen on in the relay namespace (a fresh namespace has nothing bound)."""
    return random.randint(40000, 49999) if layout.remote else free_port()


@dataclass
class Target:
    """Base class: something visitors connect to that ends at the service."""

    key: str
    label: str
    layout: Layout
    service_port: int
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    note: str = ""
    children: list[Child] = field(default_factory=list)
    #: The relay's RSS right after start (bytes), to see whether bulk buffers are given back.
    fresh_relay_rss: int | None = None

    @property
    def visitor_ns(self) -> str | None:
        return self.layout.relay_ns

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def alive(self) -> bool:
        return all(c.alive() for c in self.children)

    def relay_rss(self) -> int | None:
        """RSS of the relay side (process tree), or None when there is no relay process."""
        return None

    def client_rss(self) -> int | None:
        return None

    def sched_times(self) -> tuple[int, int] | None:
        """CPU and run-queue wait (ns) of the tunnel's processes so far; None for direct TCP."""
        return sched_times([c.pid for c in self.children]) if self.children else None


@dataclass
class DirectTarget(Target):
    """Visitors connect straight to the service: the upper limit."""

    def start(self) -> None:
        self.host = self.layout.edge_addr
        self.port = self.service_port


@dataclass
class MuxTarget(Target):
    """A real ``python -m muxtunnel server`` + ``client`` pair."""

    #: Run another tree's muxtunnel (``muxtunnel-ref``, see :func:`reference_tree`).
    reference: bool = False
    #: ``--resume-window`` for both the relay and the client (None: their default).
    resume_window: int | None = None
    #: ``muxtunnel client --connections N`` (None: not passed, one TLS connection).
    connections: int | None = None

    def resume_args(self) -> list[str]:
        """The ``--resume-window`` option both ends get (empty: the default)."""
        return [] if self.resume_window is None else ["--resume-window", str(self.resume_window)]

    def relay_connection_args(self) -> list[str]:
        """Room on the relay for more connections per session than its default allows."""
        if self.connections is None or self.connections <= RELAY_DEFAULT_CONNECTIONS:
            return []
        return ["--max-connections-per-session", str(self.connections)]

    def start(self) -> None:
        exe, env = python(), None
        if self.reference:
            ref = reference_tree()
            if ref is None:
                raise BenchError("muxtunnel-ref needs MUXTUNNEL_BENCH_REF=PYTHON:SOURCE_ROOT")
            exe, env = ref
        if self.connections is not None:
            _require_client_option(exe, env, "--connections")
        token = secrets.token_urlsafe(24)
        lo = random.randint(30000, 31800)
        sdir = self.workdir / f"{self.key}-server"
        cdir = self.workdir / f"{self.key}-client"
        sdir.mkdir(parents=True, exist_ok=True)
        cdir.mkdir(parents=True, exist_ok=True)
        server = Child(
            f"{self.key}-server",
            [
                exe,
                "-m",
                "muxtunnel",
                "server",
                "--listen",
                f"{self.layout.relay_addr}:0",
                "--bind",
                "127.0.0.1",
                "--ports",
                f"{lo}-{lo + 199}",
                "--state-dir",
                str(sdir),
                "--token",
                token,
                # The idle scenario holds 10,000 visitors on one tunnel: above the defaults.
                "--max-visitors-per-tunnel",
                "20000",
                "--max-streams-per-token",
                "20000",
                *self.resume_args(),
                *self.relay_connection_args(),
            ],
            self.workdir,
            netns=self.layout.relay_ns,
            env=env,
        )
        self.children.append(server)
        fp = server.wait_for(r"^fingerprint: (sha256:[0-9a-f]{64})", 30).group(1)
        m = server.wait_for(r"^muxtunnel relay listening on (\S+):(\d+)\s*$", 30)
        relay_port = int(m.group(2))
        client = Child(
            f"{self.key}-client",
            [
                exe,
                "-m",
                "muxtunnel",
                "client",
                "--server",
                f"{self.layout.relay_addr}:{relay_port}",
                "--token",
                token,
                "--fingerprint",
                fp,
                "--state-dir",
                str(cdir),
                # The idle scenario's 10,000 visitors are 10,000 local connections of one tunnel.
                "--max-streams-per-tunnel",
                "20000",
                "--max-streams",
                "20000",
                *self.resume_args(),
                *([] if self.connections is None else ["--connections", str(self.connections)]),
                str(self.service_port),
            ],
            self.workdir,
            netns=self.layout.edge_ns,
            env=env,
        )
        self.children.append(client)
        m = client.wait_for(r"^forwarding tcp://(\S+):(\d+) -> (\S+)\s*$", 30, watch=server)
        # The line names the relay as the client dialled it; the public port itself is bound on
        # --bind 127.0.0.1 in the relay's namespace, which is where the visitors run.
        self.host = "127.0.0.1"
        self.port = int(m.group(2))
        self.note = f"relay {self.layout.relay_addr}:{relay_port}, public {self.host}:{self.port}"
        if self.connections is not None:
            joined = _wait_joined(client, self.connections - 1, 30.0)
            self.note += f", client --connections {self.connections} ({1 + joined} connected)"

    def relay_rss(self) -> int | None:
        return tree_rss(self.children[0].pid) if self.children else None

    def client_rss(self) -> int | None:
        return tree_rss(self.children[1].pid) if len(self.children) > 1 else None


def _require_client_option(exe: str, env: dict[str, str] | None, option: str) -> None:
    """Raise a one-line BenchError when ``muxtunnel client`` of *exe* lacks *option*."""
    r = subprocess.run(
        [exe, "-m", "muxtunnel", "client", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    if option not in r.stdout:
        raise BenchError(f"this muxtunnel client has no {option} option")


def _wait_joined(client: Child, extra: int, timeout: float) -> int:
    """Wait until the client logged *extra* connections joining its session; return how many.

    Figures from a client whose extra connections never joined would measure one connection:
    raise a BenchError then.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = len(set(_JOINED.findall(client.errors())))
        if got >= extra:
            return got
        if not client.alive() or time.monotonic() > deadline:
            raise BenchError(
                f"{client.name}: only {got} of {extra} extra connections joined the session; "
                f"stderr: {client.errors()[-400:].strip()}"
            )
        time.sleep(0.05)


def sshd_available() -> str | None:
    """None when a throwaway sshd can run here, else the reason it cannot."""
    if not Path(SSHD).exists():
        return f"{SSHD} not found (install openssh-server; .ci/install-system-deps.sh does)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "ssh / ssh-keygen not found"
    if os.geteuid() != 0:
        return "sshd privilege separation needs root"
    return None


@dataclass
class SshTarget(Target):
    """A throwaway sshd on its own config plus ``ssh -N -R`` (optionally with a chosen cipher)."""

    cipher: str | None = None

    def start(self) -> None:
        why = sshd_available()
        if why:
            raise BenchError(why)
        d = self.workdir / f"{self.key}-ssh"
        d.mkdir(parents=True, exist_ok=True)
        for name in ("hostkey", "clientkey"):
            if not (d / name).exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
        shutil.copyfile(d / "clientkey.pub", d / "authorized_keys")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        sshd_port = pick_port(self.layout)
        (d / "sshd_config").write_text(
            f"ListenAddress {self.layout.relay_addr}\nPort {sshd_port}\nHostKey {d / 'hostkey'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nAllowTcpForwarding yes\nGatewayPorts no\nLogLevel INFO\n"
            f"PidFile {d / 'sshd.pid'}\nMaxStartups 100\n"
        )
        sshd = Child(
            f"{self.key}-sshd",
            [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
            self.workdir,
            netns=self.layout.relay_ns,
        )
        self.children.append(sshd)
        sshd.wait_for(r"Server listening on", 15, stderr=True)
        pub = pick_port(self.layout)
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(d / "clientkey"),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={d / 'known_hosts'}",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "ExitOnForwardFailure=yes",
        ]
        if self.cipher:
            argv += ["-c", self.cipher]
        argv += [
            "-p",
            str(sshd_port),
            "-N",
            "-R",
            f"127.0.0.1:{pub}:127.0.0.1:{self.service_port}",
            "-v",
            f"{getpass.getuser()}@{self.layout.relay_addr}",
        ]
        client = Child(f"{self.key}-ssh", argv, self.workdir, netns=self.layout.edge_ns)
        self.children.append(client)
        client.wait_for(r"remote forward success for: listen 127\.0\.0\.1:\d+", 30, stderr=True)
        m = client.wait_for(r"kex: server->client cipher: (\S+)", 1, stderr=True)
        self.host, self.port = "127.0.0.1", pub
        self.note = f"negotiated cipher {m.group(1)}"

    def relay_rss(self) -> int | None:
        return tree_rss(self.children[0].pid) if self.children else None

    def client_rss(self) -> int | None:
        return tree_rss(self.children[1].pid) if len(self.children) > 1 else None


@dataclass
class CeilingTarget(Target):
    """The bare two-process multiplexer of :mod:`muxtunnel.benchsuite.ceiling` (loopback only).

    No flow control, no scheduler, no authentication, one task wake-up per crossing: the
    ceiling a Python + trio tunnel reaches on this machine, measured beside muxtunnel and ssh
    in the same run, so a miss can be read against it.
    """

    #: ``ceiling`` relay/client flags (``--tls``: TLS 1.3; ``--raw``: raw socket calls).
    flags: tuple[str, ...] = ()

    def start(self) -> None:
        if self.layout.remote:
            raise BenchError("the bare ceiling relay runs on loopback only")
        from muxtunnel.tls import generate_self_signed

        d = self.workdir / f"{self.key}-files"
        d.mkdir(parents=True, exist_ok=True)
        cert, key = generate_self_signed("ceiling")
        (d / "cert.pem").write_bytes(cert)
        (d / "key.pem").write_bytes(key)
        module = [python(), "-m", "muxtunnel.benchsuite.ceiling"]
        common = [*self.flags, "--cert", str(d / "cert.pem"), "--key", str(d / "key.pem")]
        relay = Child(f"{self.key}-relay", [*module, "relay", *common], self.workdir)
        self.children.append(relay)
        m = relay.wait_for(r"^tunnel (\d+) public (\d+)", 20)
        client = Child(
            f"{self.key}-client",
            [*module, "client", *common, "--tunnel-port", m.group(1),
             "--service-port", str(self.service_port)],
            self.workdir,
        )  # fmt: skip
        self.children.append(client)
        self.host, self.port = "127.0.0.1", int(m.group(2))
        tls = "TLS 1.3" if "--tls" in self.flags else "plain TCP"
        self.note = f"bare relay {self.host}:{self.port} ({tls}, raw socket calls)"

    def relay_rss(self) -> int | None:
        return tree_rss(self.children[0].pid) if self.children else None

    def client_rss(self) -> int | None:
        return tree_rss(self.children[1].pid) if len(self.children) > 1 else None


ALL_TARGETS = ("direct", "muxtunnel", "ssh", "ssh-aes128")
#: The bare TLS relay of :mod:`muxtunnel.benchsuite.ceiling`: in the default loopback and
#: pgbench scenarios (not the idle-memory one, where it would measure nothing of interest).
CEILING = "ceiling"
#: ``--tls --raw``: the fastest TLS variant of the ceiling; ``ceiling-tcp`` has no TLS.
CEILING_FLAGS = {CEILING: ("--tls", "--raw"), "ceiling-tcp": ("--raw",)}
#: The client with several TLS connections per session (``--connections``), default count.
CONNS = "muxtunnel-conns"
#: N of ``muxtunnel-conns``; ``muxtunnel-conns<N>`` (2-16) names another count explicitly.
DEFAULT_CONNECTIONS = 4
MAX_CONNECTIONS = 16
#: The relay's default ``--max-connections-per-session``; larger N passes the option.
RELAY_DEFAULT_CONNECTIONS = 8
#: Scenarios whose default run adds :data:`CONNS` to the default targets (the 50 ms path).
CONNS_SCENARIOS = ("7", "7loss")
#: Allowed in --targets but never run by default (``muxtunnel-conns<N>`` is allowed too).
EXTRA_TARGETS = ("muxtunnel-ref", "muxtunnel-noresume", CONNS, CEILING, "ceiling-tcp")
LABELS = {
    "direct": "direct TCP",
    "muxtunnel": "muxtunnel",
    "muxtunnel-ref": "muxtunnel (MUXTUNNEL_BENCH_REF tree)",
    "muxtunnel-noresume": "muxtunnel --resume-window 0",
    CONNS: f"muxtunnel --connections {DEFAULT_CONNECTIONS}",
    "ssh": "ssh -R (default)",
    "ssh-aes128": "ssh -R aes128-gcm",
    CEILING: "bare TLS relay (ceiling)",
    "ceiling-tcp": "bare TCP relay (ceiling)",
}


def connections_of(key: str) -> int | None:
    """N for ``muxtunnel-conns`` / ``muxtunnel-conns<N>`` (2 to 16), else None."""
    if key == CONNS:
        return DEFAULT_CONNECTIONS
    tail = key.removeprefix(CONNS)
    if tail != key and tail.isdigit() and 2 <= int(tail) <= MAX_CONNECTIONS:
        return int(tail)
    return None


def is_target(key: str) -> bool:
    """Whether *key* names a bench target."""
    return key in LABELS or connections_of(key) is not None


def label(key: str) -> str:
    """The display name of target *key* (``muxtunnel --connections N`` for the striped ones)."""
    if key in LABELS:
        return LABELS[key]
    n = connections_of(key)
    return f"muxtunnel --connections {n}" if n is not None else key


def make_target(key: str, layout: Layout, service_port: int, workdir: Path) -> Target:
    """Build (not start) the target called *key*."""
    if not is_target(key):
        raise BenchError(f"unknown target {key!r}")
    name = label(key)
    n = connections_of(key)
    if n is not None:
        # Several TLS connections per session; the relay spreads new streams over them.
        return MuxTarget(key, name, layout, service_port, workdir, connections=n)
    if key == "direct":
        return DirectTarget(key, name, layout, service_port, workdir)
    if key == "muxtunnel":
        return MuxTarget(key, name, layout, service_port, workdir)
    if key == "muxtunnel-ref":
        return MuxTarget(key, name, layout, service_port, workdir, reference=True)
    if key == "muxtunnel-noresume":
        # Session resumption off at both ends (protocol-spec.md §10.6): its cost, A/B.
        return MuxTarget(key, name, layout, service_port, workdir, resume_window=0)
    if key == "ssh":
        return SshTarget(key, name, layout, service_port, workdir)
    if key == "ssh-aes128":
        return SshTarget(key, name, layout, service_port, workdir, cipher=AES128)
    if key in CEILING_FLAGS:
        return CeilingTarget(key, name, layout, service_port, workdir, flags=CEILING_FLAGS[key])
    raise BenchError(f"unknown target {key!r}")
