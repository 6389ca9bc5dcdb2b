"""Scenario 7's network path: two namespaces joined by a userspace delay line (``netdelay``).

The kernel here has no ``sch_netem``, so ``netdelay.c`` (compiled with gcc into a temporary
directory at run time; no binary is ever kept) forwards IP packets between a TUN device in each
namespace after a fixed one-way delay. Loss comes from an nftables ``numgen random`` drop rule on
each TUN device's input. Everything is removed again on exit (try/finally and atexit).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from muxtunnel.benchsuite.procs import BenchError, Child
from muxtunnel.benchsuite.targets import Layout

RELAY_ADDR = "198.18.0.1"
EDGE_ADDR = "198.18.0.2"
#: Transmit queue (packets) of each TUN device, in front of the delay line.
TXQUEUELEN = 10000


def netdelay_source() -> Path | None:
    """Find netdelay.c: $MUXTUNNEL_NETDELAY_SRC or the repository's benchmarks/tools."""
    here = Path(__file__).resolve().parent
    candidates = [
        os.environ.get("MUXTUNNEL_NETDELAY_SRC", ""),
        str(here.parent.parent / "benchmarks" / "tools" / "netdelay.c"),
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def unavailable_reason() -> str | None:
    """None if the namespace path can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns, TUN devices)"
    if shutil.which("ip") is None:
        return "iproute2 `ip` not found"
    if shutil.which("gcc") is None:
        return "gcc not found (needed to build netdelay.c)"
    if netdelay_source() is None:
        return "netdelay.c not found"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun missing"
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class DelayPath:
    """Two namespaces, *delay_ms* each way, relay at 198.18.0.1 and edge at 198.18.0.2."""

    def __init__(self, workdir: Path, delay_ms: float = 25.0, max_seconds: float = 1800.0) -> None:
        tag = os.getpid() % 100000
        self.relay_ns = f"mxbr{tag}"
        self.edge_ns = f"mxbe{tag}"
        self.relay_dev = f"mxtr{tag}"
        self.edge_dev = f"mxte{tag}"
        self.workdir = workdir
        self.delay_ms = delay_ms
        self.max_seconds = max_seconds
        self._delay: Child | None = None
        self._made: list[str] = []
        self.loss_percent = 0.0
        self.nft = shutil.which("nft")

    @property
    def layout(self) -> Layout:
        return Layout(
            relay_ns=self.relay_ns, edge_ns=self.edge_ns, relay_addr=RELAY_ADDR, edge_addr=EDGE_ADDR
        )

    def setup(self) -> None:
        src = netdelay_source()
        if src is None:
            raise BenchError("netdelay.c not found")
        binary = self.workdir / "netdelay"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(src)], check=True, capture_output=True)
        atexit.register(self.teardown)
        for ns in (self.relay_ns, self.edge_ns):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        self._delay = Child(
            "netdelay",
            [
                str(binary),
                self.relay_ns,
                self.relay_dev,
                self.edge_ns,
                self.edge_dev,
                str(self.delay_ms),
                "0",
                "50",
                str(int(self.max_seconds)),
            ],
            self.workdir,
        )
        self._delay.wait_for(r"^ready", 10)
        for ns, dev, addr, peer in (
            (self.relay_ns, self.relay_dev, RELAY_ADDR, EDGE_ADDR),
            (self.edge_ns, self.edge_dev, EDGE_ADDR, RELAY_ADDR),
        ):
            _ip("-n", ns, "addr", "add", addr, "peer", peer, "dev", dev)
            # The TUN device's default 500-packet transmit queue overflows whenever netdelay is
            # off the CPU for a few ms (100 direct TCP flows lost 9-17% of their segments there):
            # an artefact of the delay line, not of the emulated path. 10,000 packets stay below
            # netdelay's own ring (16,384 slots a direction).
            _ip("-n", ns, "link", "set", dev, "mtu", "9000", "txqueuelen", str(TXQUEUELEN), "up")

    def set_loss(self, percent: float) -> None:
        """Drop *percent* % of packets arriving on each TUN device (both directions)."""
        if self.nft is None:
            raise BenchError("nft not found (apt-get install nftables) - no loss variant")
        self.clear_loss()
        for ns, dev in ((self.relay_ns, self.relay_dev), (self.edge_ns, self.edge_dev)):
            script = (
                "table inet mxbloss {\n"
                "  chain in { type filter hook input priority 0; policy accept;\n"
                f'    iifname "{dev}" numgen random mod 10000 lt {round(percent * 100)} drop\n'
                "  }\n}\n"
            )
            r = subprocess.run(
                ["ip", "netns", "exec", ns, self.nft, "-f", "-"],
                input=script,
                text=True,
                capture_output=True,
                check=False,
            )
            if r.returncode != 0:
                raise BenchError(f"nft in {ns}: {r.stderr.strip()}")
        self.loss_percent = percent

    def clear_loss(self) -> None:
        if self.nft is None:
            return
        for ns in (self.relay_ns, self.edge_ns):
            subprocess.run(
                ["ip", "netns", "exec", ns, self.nft, "delete", "table", "inet", "mxbloss"],
                capture_output=True,
                check=False,
            )
        self.loss_percent = 0.0

    def tx_drops(self) -> int:
        """Packets dropped so far at both TUN devices' transmit queues (in front of netdelay)."""
        total = 0
        for ns, dev in ((self.relay_ns, self.relay_dev), (self.edge_ns, self.edge_dev)):
            with contextlib.suppress(OSError, ValueError):
                stats = Path(f"/sys/class/net/{dev}/statistics/tx_dropped")
                # /sys shows the current namespace's devices only: read it from inside *ns*.
                r = subprocess.run(
                    ["ip", "netns", "exec", ns, "cat", str(stats)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                total += int(r.stdout.strip() or 0)
        return total

    def teardown(self) -> None:
        """Stop the delay line and delete the namespaces (idempotent)."""
        if self._delay is not None:
            with contextlib.suppress(Exception):
                self._delay.stop()
            self._delay = None
        while self._made:
            ns = self._made.pop()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
