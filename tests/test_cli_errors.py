"""Error messages that say what to do, and the help a newcomer reads, from the real CLI.

Each case runs ``python -m muxtunnel`` (or :func:`muxtunnel.cli.run` in this process) the way
a new user would and asserts the one ``muxtunnel: error:`` line: what went wrong, where, and
what to try instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from muxtunnel import cli
from tests.system.harness import ProcessGroup, muxtunnel_command, muxtunnel_env, start_relay

if TYPE_CHECKING:
    from collections.abc import Iterator

ERROR_LINE = re.compile(r"^muxtunnel: error: \S.*$")
#: Box drawing of rich panels (typer's help and error panels).
BOX_CHARS = re.compile("[\u2500-\u257f]")
#: How typer shows a Python type where a metavariable belongs.
PYTHON_TYPES = re.compile(
    r"<(?:bool|str|int|float|path|list\[[a-z]+\])>|\b(?:INTEGER|FLOAT|TEXT)\b"
)


def mux(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``muxtunnel ARGS`` as a process with stdout and stderr captured (not a terminal)."""
    return subprocess.run(
        [*muxtunnel_command(), *args],
        capture_output=True,
        text=True,
        env=env or muxtunnel_env(tmp_path),
        cwd=tmp_path,
        timeout=timeout,
        check=False,
    )


def error_line(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """The process exited ``code`` with one ``muxtunnel: error:`` line holding ``fragments``."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("muxtunnel: error:")]
    assert len(errors) == 1, proc.stderr
    assert ERROR_LINE.match(errors[0]), errors[0]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@contextlib.contextmanager
def held_port() -> Iterator[socket.socket]:
    """A loopback port bound by this test and listening (so nobody else can take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


class GarbageServer:
    """A plain TCP server that answers every connection like a web server would."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.sendall(self.answer)
                    conn.recv(4096)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.close()


# --------------------------------------------------------------------------------------------
# Connecting to the relay


def test_connection_refused_asks_whether_the_relay_runs_and_says_it_once(
    tmp_path: Path,
) -> None:
    env = muxtunnel_env(tmp_path) | {"MUXTUNNEL_TOKEN": "some-token"}
    with refusing_port() as port:
        address = f"127.0.0.1:{port}"
        proc = mux(
            tmp_path,
            "client",
            "--server",
            address,
            "--max-retries",
            "3",
            "--backoff-cap",
            "0.1",
            "--admin",
            "off",
            "22",
            env=env,
        )
    line = error_line(proc, 1, f"cannot connect to relay {address}: connection refused")
    assert line.endswith(f"is the relay running on {address}?"), line
    # Four attempts, one warning: the repeats are counted at debug level, not warned again.
    warnings = [ln for ln in proc.stderr.splitlines() if " WARNING " in ln and address in ln]
    assert len(warnings) == 1, proc.stderr
    assert f"is the relay running on {address}?" in warnings[0]
    assert proc.stderr.count("reconnecting to") == 1, proc.stderr


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n"],
    ids=["http", "ssh"],
)
def test_a_port_that_does_not_speak_tls_is_named_and_not_retried(
    tmp_path: Path, answer: bytes
) -> None:
    server = GarbageServer(answer)
    try:
        env = muxtunnel_env(tmp_path) | {"MUXTUNNEL_TOKEN": "some-token"}
        address = f"127.0.0.1:{server.port}"
        # No --max-retries: the client must give up by itself (a wrong --server stays wrong).
        proc = mux(tmp_path, "client", "--server", address, "22", env=env, timeout=30)
    finally:
        server.close()
    line = error_line(proc, 1, f"{address} does not speak TLS — not a muxtunnel relay?")
    assert "wrong version number" in line
    assert server.accepted == 1


# --------------------------------------------------------------------------------------------
# The relay's listeners: checked before a certificate or token exists


@pytest.mark.parametrize("option", ["--listen", "--admin", "--metrics"])
def test_address_in_use_is_named_before_anything_is_generated(tmp_path: Path, option: str) -> None:
    state = tmp_path / "fresh-state"
    with held_port() as sock:
        taken = f"127.0.0.1:{sock.getsockname()[1]}"
        args = ["server", "--state-dir", str(state), "--listen", "127.0.0.1:0"]
        if option == "--listen":
            args[-1] = taken
        else:
            args += [option, taken]
        proc = mux(tmp_path, *args)
    error_line(proc, 1, f"cannot listen on {taken} ({option}): Address already in use")
    # Nothing printed, nothing generated: no token shown that a restart would not show again.
    assert proc.stdout == ""
    assert not state.exists()


# --------------------------------------------------------------------------------------------
# Options and the config file


@pytest.mark.parametrize(
    ("value", "suggestion"),
    [
        ("tcp://relay.example.com:7835", "try --server relay.example.com:7835"),
        ("tls://127.0.0.1", "try --server 127.0.0.1"),
    ],
)
def test_server_with_a_scheme_gets_a_scheme_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, suggestion: str
) -> None:
    capsys.readouterr()
    code = cli.run(["client", "--server", value, "--token", "t", "--admin", "off", "22"])
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("muxtunnel: error:")]
    assert code == 2, err
    assert len(line) == 1, err
    assert "--server takes HOST[:PORT], without a scheme" in line[0]
    assert suggestion in line[0]
    assert "IPv6" not in line[0]


def test_ports_with_a_colon_names_the_expected_form(tmp_path: Path) -> None:
    proc = mux(tmp_path, "server", "--ports", "50000:50099", "--state-dir", str(tmp_path / "s"))
    error_line(proc, 2, "option --ports", "expected LO-HI, e.g. 50000-50099", "'50000-50099'")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", ["client", "server"])
def test_top_level_server_key_and_server_table_clash_is_explained(
    tmp_path: Path, command: str
) -> None:
    config = tmp_path / "muxtunnel.toml"
    config.write_text(
        'server = "relay.example.com:7835"\ntoken = "t"\n\n[server]\nlisten = "0.0.0.0:7835"\n'
    )
    config.chmod(0o600)
    args = [command, "--config", str(config)] + (["22"] if command == "client" else [])
    line = error_line(mux(tmp_path, *args), 2, str(config))
    assert "top-level key 'server' (the client's relay address" in line
    assert "[server] table (the relay's options)" in line
    assert "[client] table" in line
    assert "Cannot overwrite" not in line


@pytest.mark.parametrize("command", ["client", "visit"])
def test_client_token_file_with_several_tokens_is_refused(tmp_path: Path, command: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("first-token\nsecond-token\n")
    tokens.chmod(0o600)
    args = [command, "--server", "127.0.0.1:7835", "--token-file", str(tokens)]
    args += ["22"] if command == "client" else ["ssh", "2222"]
    error_line(
        mux(tmp_path, *args),
        2,
        f"token file {tokens}: holds 2 tokens",
        "a client uses exactly one (it would have used the first)",
    )


# --------------------------------------------------------------------------------------------
# The state dir


def test_state_dir_that_is_a_file_says_which_path_and_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    for state in (blocker, blocker / "state"):
        proc = mux(tmp_path, "server", "--listen", "127.0.0.1:0", "--state-dir", str(state))
        error_line(proc, 2, "cannot ", f"{state}:", "or pass --state-dir DIR")
        assert proc.stdout == ""


def test_state_dir_file_in_the_way_says_which_file_and_the_fix(tmp_path: Path) -> None:
    state = tmp_path / "relay-state"
    (state / "token").mkdir(parents=True)
    proc = mux(tmp_path, "server", "--listen", "127.0.0.1:0", "--state-dir", str(state))
    error_line(proc, 2, f"cannot read {state / 'token'}: Is a directory", "or pass --state-dir DIR")
    assert "token:" not in proc.stdout


def test_unreadable_known_hosts_says_which_file_and_the_fix(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    relay = start_relay(procs, tmp_path, token="the-token")
    state = tmp_path / "client-state"
    (state / "known_hosts").mkdir(parents=True)
    env = muxtunnel_env(tmp_path) | {"MUXTUNNEL_TOKEN": "the-token"}
    proc = mux(
        tmp_path,
        "client",
        "--server",
        relay.address,
        "--state-dir",
        str(state),
        "--admin",
        "off",
        "22",
        env=env,
        timeout=30,
    )
    error_line(
        proc,
        2,
        f"cannot read {state / 'known_hosts'}: Is a directory",
        "or pass --state-dir DIR",
    )


# --------------------------------------------------------------------------------------------
# A wrong token


def test_authentication_failed_is_said_once_on_each_side(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    relay = start_relay(procs, tmp_path, token="the-right-token")
    env = muxtunnel_env(tmp_path) | {"MUXTUNNEL_TOKEN": "a-wrong-token"}
    proc = mux(
        tmp_path,
        "client",
        "--server",
        relay.address,
        "--fingerprint",
        relay.fingerprint,
        "--admin",
        "off",
        "22",
        env=env,
        timeout=30,
    )
    line = error_line(proc, 3, "the relay refused the token")
    assert proc.stderr.count("authentication failed") == 1, proc.stderr
    assert line.count("authentication failed") == 1
    relay.proc.wait_for_line(
        re.compile("authentication failed from 127.0.0.1"), stream="stderr", timeout=10
    )
    relay.proc.terminate()
    relay_err = "\n".join(relay.proc.stderr_lines)
    assert relay_err.count("authentication failed") == 1, relay_err


# --------------------------------------------------------------------------------------------
# Help and completion

ALL_COMMANDS = [
    [],
    ["server"],
    ["client"],
    ["visit"],
    ["status"],
    ["fingerprint"],
    ["demo"],
    ["bench"],
    ["token"],
    ["token", "add"],
    ["token", "list"],
    ["token", "remove"],
]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: " ".join(c) or "muxtunnel")
def test_help_in_a_pipe_shows_metavariables_and_no_boxes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    capsys.readouterr()
    assert cli.run([*command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Usage: muxtunnel {' '.join(command)}".replace("  ", " ")), text
    assert not BOX_CHARS.search(text), text
    assert not PYTHON_TYPES.search(text), PYTHON_TYPES.findall(text)
    assert "{" not in text.splitlines()[0], text.splitlines()[0]


def test_help_names_what_to_type(tmp_path: Path) -> None:
    server = mux(tmp_path, "server", "--help").stdout
    client = mux(tmp_path, "client", "--help").stdout
    bench = mux(tmp_path, "bench", "--help").stdout
    assert "Usage: muxtunnel client [OPTIONS] [SPEC...]\n" in client
    for fragment in ("--server HOST[:PORT]", "--allow CIDR", "--max-retries N", "--ca FILE"):
        assert fragment in client, fragment
    for fragment in ("--listen HOST:PORT", "--ports LO-HI", "--lease SECONDS", "--state-dir DIR"):
        assert fragment in server, fragment
    # bench is a command like the others: same usage line and option style.
    assert bench.startswith("Usage: muxtunnel bench [OPTIONS]\n")
    for fragment in ("--quick ", "--runs N", "--verify / --no-verify", "--json FILE"):
        assert fragment in bench, fragment
    for text in (server, client, bench):
        assert not BOX_CHARS.search(text)
        assert not PYTHON_TYPES.search(text)


def test_help_on_a_terminal_keeps_its_panels_without_python_types(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    env = muxtunnel_env(tmp_path) | {"TERM": "xterm", "COLUMNS": "120"}
    child = subprocess.Popen(
        [*muxtunnel_command(), "client", "--help"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        cwd=tmp_path,
    )
    os.close(terminal)
    chunks = []
    try:
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(controller)
        assert child.wait(30) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    assert BOX_CHARS.search(text), text
    assert "CIDR" in text
    assert "SPEC..." in text
    assert not PYTHON_TYPES.search(text), PYTHON_TYPES.findall(text)


def test_bench_options_reach_the_suite(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import muxtunnel.benchsuite as suite

    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setattr(suite, "main", fake_main)
    assert cli.run(["bench", "--quick"]) == 7
    assert cli.run(["bench", "--runs", "2", "--no-verify", "--targets", "direct,muxtunnel"]) == 7
    assert seen == [
        ["--quick"],
        ["--no-verify", "--targets", "direct,muxtunnel", "--runs", "2"],
    ]
    capsys.readouterr()
    assert cli.run(["bench", "--runs", "0"]) == 2
    assert "--runs" in capsys.readouterr().err


def test_bench_renders_saved_results_through_the_typer_options(tmp_path: Path) -> None:
    saved = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.json"
    written = tmp_path / "again.json"
    proc = mux(tmp_path, "bench", "--render", str(saved), "--json", str(written))
    assert proc.returncode == 0, proc.stderr
    assert "1 one stream up (put)" in proc.stdout
    assert f"wrote {written}" in proc.stdout
    assert json.loads(written.read_text())


def test_shell_completion(tmp_path: Path) -> None:
    root_help = mux(tmp_path, "--help").stdout
    assert "--install-completion" in root_help
    script = mux(tmp_path, "--show-completion", "bash")
    assert script.returncode == 0, script.stderr
    assert "_MUXTUNNEL_COMPLETE=complete_bash" in script.stdout
    assert "complete -o default -F _muxtunnel_completion muxtunnel" in script.stdout
    # What bash runs on TAB: the words so far in, the candidates out.
    env = muxtunnel_env(tmp_path) | {
        "_MUXTUNNEL_COMPLETE": "complete_bash",
        "COMP_WORDS": "muxtunnel client --ser",
        "COMP_CWORD": "2",
    }
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from muxtunnel.cli import main; sys.argv[0] = 'muxtunnel'; main()",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert completed.stdout.split() == ["--server"], (completed.stdout, completed.stderr)
