"""SIGHUP reloads the relay's token file without a restart (muxtunnel.reload).

A relay process reads a TOML token file holding "keep" and "drop"; one client process per
token. After "drop" is removed from the file and the relay gets SIGHUP: the "drop" client exits
with status 3 saying its token was revoked and its public port is free at once, while a stream
through the "keep" client carries bytes before and after without a break, in the same relay
process, and the new policy of "keep" (one visitor per tunnel) applies to its next visitor. A
token added to the file works at once; a broken file keeps the old tokens and the relay says
why in one line. SIGUSR1 logs a status line; the client logs that it cannot reload.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import signal
import socket
import time
from typing import TYPE_CHECKING

import pytest

from .harness import (
    EchoServer,
    ProcessGroup,
    port_is_listening,
    start_client,
    start_relay,
    wait_until,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.system


def stored_key_hex(token: str) -> str:
    """The token file's verifier, computed as protocol-spec.md §7.1 defines it."""
    client_key = hmac.new(token.encode(), b"muxtunnel/1 client key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).hexdigest()


def write_tokens(path: Path, tokens: dict[str, str], policy: dict[str, str] | None = None) -> None:
    """Replace ``path`` atomically with a named token file holding ``tokens`` (name -> token),
    with ``policy`` lines (name -> TOML lines) added to their tables."""
    policy = policy or {}
    text = "".join(
        f'[[token]]\nname = "{name}"\nhash = "sha256:{stored_key_hex(token)}"\n'
        f"{policy.get(name, '')}\n"
        for name, token in tokens.items()
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o600)
    os.replace(tmp, path)


def echo_once(sock: socket.socket, payload: bytes) -> None:
    """Send ``payload`` on an open visitor connection and read the same bytes back."""
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(got)} of {len(payload)} echoed bytes"
        got += chunk
    assert got == payload


def visitor_refused(port: int) -> bool:
    """True if a visitor on ``port`` is reset or closed without getting a byte back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"anyone there?")
            return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def count_lines(lines: list[str], pattern: str) -> int:
    return sum(1 for line in lines if re.search(pattern, line))


def test_sighup_revokes_a_removed_token_and_keeps_the_rest(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    tokens = {"keep": secrets.token_urlsafe(24), "drop": secrets.token_urlsafe(24)}
    token_file = tmp_path / "tokens.toml"
    write_tokens(token_file, tokens)
    relay = start_relay(
        procs,
        tmp_path,
        token=secrets.token_urlsafe(24),
        extra_args=["--token-file", str(token_file), "--lease", "300"],
    )
    relay_pid = relay.proc.pid

    with EchoServer() as echo:
        spec = [f"0:127.0.0.1:{echo.port}"]
        keep = start_client(procs, tmp_path, relay, spec, token=tokens["keep"], name="keep")
        drop = start_client(procs, tmp_path, relay, spec, token=tokens["drop"], name="drop")
        (keep_fwd,) = keep.forwards
        (drop_fwd,) = drop.forwards

        with socket.create_connection(("127.0.0.1", keep_fwd.port), timeout=20) as stream:
            echo_once(stream, b"before the reload " * 1000)
            with socket.create_connection(("127.0.0.1", keep_fwd.port), timeout=20) as second:
                echo_once(second, b"a second visitor is welcome")

            # Remove "drop", add "fresh", limit "keep" to one visitor per tunnel, and reload.
            fresh = secrets.token_urlsafe(24)
            write_tokens(
                token_file,
                {"keep": tokens["keep"], "fresh": fresh},
                {"keep": "max_visitors = 1\n"},
            )
            hup_at = time.monotonic()
            relay.proc.send_signal(signal.SIGHUP)
            relay.proc.wait_for_line(
                re.compile(
                    r"reloaded: 3 tokens; added fresh; removed drop; changed keep; 1 sessions closed"
                ),
                stream="stderr",
            )

            # The revoked client exits 3 and says so; its port is free at once (lease is 300 s).
            assert drop.proc.wait_exit(timeout=20) == 3, drop.proc.describe()
            assert re.search(
                r"muxtunnel: error: relay \S+ revoked the token: .*token revoked",
                "\n".join(drop.proc.stderr_lines),
            ), drop.proc.describe()
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", drop_fwd.port))
            assert time.monotonic() - hup_at < 15
            assert count_lines(relay.proc.stderr_lines, r"token drop revoked; session closed") == 1

            # The kept client's open stream goes on, in the same relay process.
            echo_once(stream, b"after the reload " * 1000)
            assert relay.proc.returncode is None
            assert relay.proc.pid == relay_pid
            assert keep.proc.returncode is None
            # ... and its token's new policy applies to the next visitor.
            assert visitor_refused(keep_fwd.port)
            relay.proc.wait_for_line(
                re.compile(rf"port {keep_fwd.port}: 1 visitors connected, token keep's limit"),
                stream="stderr",
            )
            echo_once(stream, b"the first visitor still goes on")

            # The added token authenticates without a restart.
            added = start_client(procs, tmp_path, relay, spec, token=fresh, name="fresh")
            (added_fwd,) = added.forwards
            with socket.create_connection(("127.0.0.1", added_fwd.port), timeout=20) as other:
                echo_once(other, b"new token")

            # A broken file keeps the old tokens, with one line saying why.
            token_file.write_text("[[token]\nname = \n", encoding="utf-8")
            before = len(relay.proc.stderr_lines)
            relay.proc.send_signal(signal.SIGHUP)
            _, at = relay.proc.wait_for_line(
                re.compile(r"ERROR muxtunnel\.reload: reload failed, keeping the old settings: "),
                stream="stderr",
                start=before,
            )
            assert str(token_file) in relay.proc.stderr_lines[at]
            again = start_client(procs, tmp_path, relay, spec, token=fresh, name="fresh-again")
            assert again.forwards
            echo_once(stream, b"after a failed reload")

            # SIGUSR1: one status line, nothing else happens.
            relay.proc.send_signal(signal.SIGUSR1)
            relay.proc.wait_for_line(
                re.compile(r"status: 3 sessions, 3 tunnels, [0-9]+ open streams"),
                stream="stderr",
                start=before,
            )
            # The client cannot reload: it says so and keeps forwarding.
            keep.proc.send_signal(signal.SIGHUP)
            keep.proc.wait_for_line(
                re.compile(r"reload is not supported by the client; restart it"), stream="stderr"
            )
            echo_once(stream, b"after the client's SIGHUP")

        assert relay.proc.returncode is None
        assert keep.proc.returncode is None
        assert count_lines(relay.proc.stderr_lines, r"reload failed") == 1
        # The kept token's tunnel is still served (a one-second connect can miss on a loaded
        # machine, so it gets a few tries; the relay's and the client's output on failure).
        wait_until(
            lambda: port_is_listening(keep_fwd.port),
            timeout=15,
            what=f"keep's public port {keep_fwd.port} accepting connections",
            details=lambda: relay.proc.describe() + "\n" + keep.proc.describe(),
        )
