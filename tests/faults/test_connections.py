"""Several connections per session, and refused resumes, as a user sees them (protocol-spec.md
§10.6, §10.7), in network namespaces with real processes.

- ``--connections 3``: one of the client's TLS connections to the relay dies (its socket is
  destroyed in the client's namespace, the relay gets an RST) while the router lets no new
  connection from the client through: its streams resume over one of the two remaining
  connections, every byte arrives, and once new connections pass again the carried connection
  gets one of its own.
- A resume is refused when its ticket is stale (superseded by two later resumes) or presented
  with another token, and when the token was revoked by a reload during the outage: the probe
  runs in the client's namespace against the relay process across the router.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .netlab import build_tunnel, record

if TYPE_CHECKING:
    from tests.system.harness import ManagedProcess

    from .netlab import Host, Lab

pytestmark = pytest.mark.netns

MiB = 1 << 20
KEEPALIVE = ["--keepalive-timeout", "4", "--resume-window", "60"]
_RECEIVING = re.compile(r"^receiving$")
_JSON = re.compile(r"^\{.*\}$")
_CARRIED = re.compile(r"resumed over another connection of the session after (?P<s>[\d.]+) s")
_OWN_AGAIN = re.compile(r"runs on a connection of its own again")
PROBE = Path(__file__).with_name("ticket_probe.py")


def _result(proc: ManagedProcess, lab: Lab, timeout: float = 120.0) -> dict[str, Any]:
    match, _ = proc.wait_for_line(
        _JSON, timeout=timeout, what="its JSON result", context=lab.describe
    )
    out: dict[str, Any] = json.loads(match.group(0))
    return out


def _relay_connections(host: Host, port: int) -> list[int]:
    """Local ports of ``host``'s established TCP connections to ``port``."""
    out = host.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"]).stdout
    return sorted(int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if line)


def _router_blocks_new_connections(lab: Lab, host: Host, port: int, *, on: bool) -> None:
    """The router drops (or again forwards) SYNs from ``host`` to ``port``; established
    connections pass either way."""
    table = "mxnosyn"
    if on:
        script = (
            f"table inet {table} {{\n"
            "  chain nosyn { type filter hook forward priority -5; policy accept;\n"
            f'    iifname "{host.link.router_dev}" tcp dport {port} '
            "tcp flags & (syn | ack) == syn drop\n"
            "  }\n}\n"
        )
        argv = ["ip", "netns", "exec", lab.router_ns, "nft", "-f", "-"]
        subprocess.run(argv, input=script, text=True, check=True, timeout=30)
    else:
        argv = ["ip", "netns", "exec", lab.router_ns, "nft", "delete", "table", "inet", table]
        subprocess.run(argv, check=True, timeout=30, capture_output=True)


def test_a_dead_connection_resumes_on_a_remaining_one(lab: Lab) -> None:
    t = build_tunnel(
        lab, service_lan=True, relay_args=KEEPALIVE, client_args=[*KEEPALIVE, "--connections", "3"]
    )
    t.client.proc.wait_for_line(
        re.compile(r"connection 3 to relay .* joined the session"), stream="stderr", timeout=30
    )
    relay_port = t.relay.port
    ports = _relay_connections(t.client_host, relay_port)
    assert len(ports) == 3, ports
    size = 24 * MiB
    streams = [t.visit("echo", size, seed, rate=4 * MiB, timeout=90) for seed in range(61, 67)]
    for s in streams:
        s.wait_for_line(_RECEIVING, timeout=30)
    time.sleep(1.0)  # every stream well under way
    _router_blocks_new_connections(lab, t.client_host, relay_port, on=True)
    victim = ports[1]
    cut = time.monotonic()
    t.client_host.run(
        [
            "ss",
            "-K",
            "-tn",
            "state",
            "established",
            f"( dport = :{relay_port} and sport = :{victim} )",
        ]
    )
    match, _ = t.client.proc.wait_for_line(
        _CARRIED, stream="stderr", timeout=20, context=lab.describe
    )
    carried_after = time.monotonic() - cut
    # No new TCP connection could reach the relay: the session still runs over two.
    assert len(_relay_connections(t.client_host, relay_port)) == 2
    time.sleep(2.0)
    _router_blocks_new_connections(lab, t.client_host, relay_port, on=False)
    t.client.proc.wait_for_line(_OWN_AGAIN, stream="stderr", timeout=20, context=lab.describe)
    results = [_result(s, lab) for s in streams]
    bad = [r for r in results if not r["ok"]]
    assert not bad, f"{json.dumps(bad)}\n{lab.describe()}"
    assert all(r["verified"] == size for r in results)
    assert len(_relay_connections(t.client_host, relay_port)) == 3
    t.check_logs()
    record(
        "connections-carried",
        resumed_after_s=round(float(match["s"]), 2),
        carried_within_s=round(carried_after, 2),
        bytes_checked=sum(r["verified"] for r in results),
    )


def test_stale_foreign_and_revoked_tickets_are_refused(lab: Lab, tmp_path: Path) -> None:
    relay_host = lab.host("relay")
    client_host = lab.host("client")
    token, other = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{token}\n{other}\n")
    token_file.chmod(0o600)
    relay = lab.start_relay(
        relay_host,
        token=secrets.token_urlsafe(24),
        extra_args=[*KEEPALIVE, "--token-file", str(token_file)],
    )
    probe = client_host.start(
        "probe",
        [sys.executable, "-u", str(PROBE), relay.address, token, other],
    )
    # Stale and foreign tickets first; then the probe's session loses its link.
    probe.wait_for_line(re.compile(r"^ready$"), timeout=60, context=lab.describe)
    client_host.link.cut()
    probe.wait_for_line(re.compile(r"^suspended$"), timeout=30, context=lab.describe)
    # The token is removed by a reload while the client is away.
    token_file.write_text(f"{other}\n")
    relay.proc.send_signal(signal.SIGHUP)
    relay.proc.wait_for_line(
        re.compile(r"reloaded: "), stream="stderr", timeout=20, context=lab.describe
    )
    client_host.link.restore()
    outcome = _result(probe, lab, timeout=60)
    assert outcome["stale"] == "TICKET_UNKNOWN", outcome
    assert outcome["foreign"] == "TICKET_UNKNOWN", outcome
    assert outcome["current_resumes"], outcome
    assert outcome["revoked"].startswith("authentication failed"), outcome
    record("resume-refusals", **{k: v for k, v in outcome.items() if k != "revoked"})
