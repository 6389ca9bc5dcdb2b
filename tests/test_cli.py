"""The ``muxtunnel`` command line, run as real processes (``python -m muxtunnel``).

A few checks also call :func:`muxtunnel.cli.run` in-process, so that coverage sees the
error mapping without subprocess coverage.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel import __version__, cli
from muxtunnel.tls import load_or_create_identity, normalize_fingerprint

if TYPE_CHECKING:
    from collections.abc import Iterator

ERROR_LINE = re.compile(r"^muxtunnel: error: \S.*$")


def clean_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a child: its own HOME and state dir, no token from the outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUXTUNNEL_", "COVERAGE_"))}
    env["HOME"] = str(tmp_path / "home")
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    env["PYTHONUNBUFFERED"] = "1"
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def mux(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "muxtunnel", *args],
        capture_output=True,
        text=True,
        env=env or clean_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def run_in_process(
    capsys: pytest.CaptureFixture[str], *args: str
) -> subprocess.CompletedProcess[str]:
    """``muxtunnel ARGS`` through :func:`muxtunnel.cli.run` in this process."""
    capsys.readouterr()
    code = cli.run(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """In-process runs configure the root logger; undo that after each test."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield
    for handler in root.handlers[:]:
        if handler not in saved[1]:
            root.removeHandler(handler)
    root.setLevel(saved[0])


def assert_one_error_line(
    proc: subprocess.CompletedProcess[str], code: int, *fragments: str
) -> str:
    """The process exited ``code`` with exactly one ``muxtunnel: error:`` line and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert ERROR_LINE.match(lines[0]), lines[0]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    proc = mux(tmp_path, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"muxtunnel {__version__}\n"
    assert proc.stderr == ""


def test_fingerprint_command(tmp_path: Path) -> None:
    state = tmp_path / "relay-state"
    identity = load_or_create_identity(state)
    proc = mux(tmp_path, "fingerprint", "--state-dir", str(state))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == identity.fingerprint + "\n"
    assert (
        normalize_fingerprint(proc.stdout) == identity.fingerprint
    )  # the form --fingerprint takes

    by_cert = mux(tmp_path, "fingerprint", "--cert", str(identity.cert_path))
    assert by_cert.stdout == proc.stdout

    assert_one_error_line(
        mux(tmp_path, "fingerprint", "--state-dir", str(tmp_path / "empty")),
        2,
        "no certificate in",
        "--cert FILE",
    )


def test_fingerprint_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the default state dir follows XDG_STATE_HOME
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    default = load_or_create_identity(tmp_path / "xdg" / "muxtunnel")
    assert cli.run(["fingerprint"]) == 0
    assert capsys.readouterr().out == default.fingerprint + "\n"
    proc = run_in_process(
        capsys, "fingerprint", "--state-dir", str(tmp_path), "--cert", str(default.cert_path)
    )
    assert_one_error_line(proc, 2, "either --state-dir or --cert")


@pytest.mark.parametrize(
    ("args", "fragments", "as_process"),
    [
        (("server", "--bogus"), ("No such option: --bogus", "muxtunnel server --help"), True),
        (("frobnicate",), ("No such command 'frobnicate'",), True),
        (("client", "--server", "r", "--max-retries", "many", "22"), ("--max-retries",), True),
        (("client", "--token", "t", "22"), ("missing --server",), True),
        (("client", "--server", "relay", "--token", "t"), ("no tunnels",), False),
        (
            ("client", "--server", "r", "--token", "t", "::1:22"),
            ("IPv6 addresses in brackets",),
            False,
        ),
        (("server", "--ports", "9-1"), ("option --ports: empty range 9-1",), False),
        (("server", "--cert", "c.pem"), ("--cert needs --key",), False),
        (("server", "--log-level", "loud"), ("--log-level",), False),
        (("demo", "--local", "0"), ("--local",), False),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    fragments: tuple[str, ...],
    as_process: bool,
) -> None:
    proc = mux(tmp_path, *args) if as_process else run_in_process(capsys, *args)
    assert_one_error_line(proc, 2, *fragments)


def test_no_arguments_prints_help_and_exits_2(tmp_path: Path) -> None:
    proc = mux(tmp_path)
    assert proc.returncode == 2
    assert "server" in proc.stdout
    assert "client" in proc.stdout


def test_bad_config_file_names_the_key(tmp_path: Path) -> None:
    relay = tmp_path / "relay.toml"
    relay.write_text('listen = "127.0.0.1:7000"\nport_range = "1-2"\n')
    assert_one_error_line(
        mux(tmp_path, "server", "--config", str(relay)), 2, "unknown key 'port_range'"
    )

    client = tmp_path / "client.toml"
    client.write_text('server = "relay.example.com"\ntoken = "t"\n[[tunnel]]\nlocal_port = "ssh"\n')
    line = assert_one_error_line(
        mux(tmp_path, "client", "--config", str(client)), 2, "key 'local_port'"
    )
    assert str(client) in line


def test_bad_config_value_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    relay = tmp_path / "relay.toml"
    relay.write_text('drain_timeout = "soon"\n')
    proc = run_in_process(capsys, "server", "--config", str(relay))
    assert_one_error_line(proc, 2, f"config file {relay}: key 'drain-timeout'")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = mux(tmp_path, "--debug", "fingerprint", "--cert", str(tmp_path / "missing.pem"))
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("muxtunnel: error: certificate ")


def test_demo_once_is_the_main_job(tmp_path: Path) -> None:
    """README's quick start: ``muxtunnel demo --once`` tunnels, self-checks and exits 0."""
    proc = mux(tmp_path, "demo", "--once", "--log-level", "warning")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert re.search(
        r"^forwarding tcp://127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+$", proc.stdout, re.M
    ), proc.stdout
    assert "self-check passed" in proc.stdout
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# In-process: the same entry point, seen by coverage


def test_run_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["--version"]) == 0
    assert capsys.readouterr().out == f"muxtunnel {__version__}\n"
    identity = load_or_create_identity(tmp_path / "s")
    assert cli.run(["fingerprint", "--state-dir", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out == identity.fingerprint + "\n"
    assert cli.run(["server", "--listen", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("muxtunnel: error: option --listen: ")
    assert (
        cli.run(["client", "--server", "r", "--token", "t", "--fingerprint", "sha256:1", "22"]) == 2
    )
    assert "option --fingerprint" in capsys.readouterr().err


def test_primary_error_unwraps_exception_groups() -> None:
    from muxtunnel.errors import AuthError, IdentityMismatchError

    group = BaseExceptionGroup(
        "x", [RuntimeError("boom"), ExceptionGroup("y", [AuthError("refused")])]
    )
    assert isinstance(cli._primary(group), AuthError)
    assert cli._describe(cli._primary(group)) == ("refused", 3)
    assert cli._describe(IdentityMismatchError("changed"))[1] == 4
    assert cli._describe(RuntimeError("boom")) == ("RuntimeError: boom", 1)
    assert cli._describe(FileNotFoundError(2, "No such file or directory", "x.pem")) == (
        "x.pem: No such file or directory",
        1,
    )


class _OnLog(logging.Handler):
    """Sets a trio.Event when a record containing ``text`` is logged (in the trio thread)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_signals_drain_then_force(caplog: pytest.LogCaptureFixture) -> None:
    """First SIGTERM/SIGINT sets ``shutdown``; a second one cancels; without drain the first cancels."""

    async def drains(shutdown: trio.Event) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(5):
            await shutdown.wait()
        return "drained"

    assert trio.run(cli._with_signals, drains, True) == "drained"

    survived_duplicate: list[bool] = []
    # The repeat window is measured on trio's clock: a mock clock that only moves when told to
    # (or when the run is stuck for 1 s, which then trips fail_after).
    clock = trio.testing.MockClock(autojump_threshold=1.0)
    duplicate = _OnLog("again at once")
    caplog.set_level(logging.DEBUG, logger="muxtunnel.cli")
    logging.getLogger("muxtunnel.cli").addHandler(duplicate)

    async def stubborn(shutdown: trio.Event) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        with trio.fail_after(5):
            await shutdown.wait()
        os.kill(os.getpid(), signal.SIGINT)  # a duplicate (timeout(1) sends two): ignored
        with trio.fail_after(5):
            await duplicate.seen.wait()
        clock.jump(cli.SIGNAL_REPEAT_WINDOW + 0.2)
        survived_duplicate.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
        await trio.sleep_forever()  # cancelled by the second request

    try:
        with pytest.raises(cli._ForcedStop):
            trio.run(cli._with_signals, stubborn, True, clock=clock)
    finally:
        logging.getLogger("muxtunnel.cli").removeHandler(duplicate)
    assert survived_duplicate == [True]

    async def no_drain(shutdown: trio.Event) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        await trio.sleep_forever()  # cancelled by the first signal

    assert trio.run(cli._with_signals, no_drain, False) is None


# --------------------------------------------------------------------------------------------
# The relay process: identity and token on stdout, clean exit on SIGTERM


def read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> list[str]:
    """stdout lines of ``proc`` up to and including the first one matching ``pattern``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return seen
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"no line matching {pattern!r}; stdout: {seen}; stderr: {err}")


def test_server_generates_token_once_and_stops_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "relay"
    args = [
        sys.executable,
        "-m",
        "muxtunnel",
        "server",
        "--listen",
        "127.0.0.1:0",
        "--bind",
        "127.0.0.1",
    ]
    args += ["--ports", "40000-40009", "--state-dir", str(state)]
    env = clean_env(tmp_path)
    runs: list[list[str]] = []
    for _ in range(2):
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            lines = read_until(proc, r"^muxtunnel relay listening on 127\.0\.0\.1:\d+$")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        runs.append(lines)
    token = (state / "token").read_text().strip()
    assert stat.S_IMODE((state / "token").stat().st_mode) == 0o600
    first, second = runs
    assert re.fullmatch(r"fingerprint: sha256:[0-9a-f]{64}", first[0])
    assert first[1] == f"token: {token}"
    assert first[2].startswith("hint: ")
    assert str(state / "token") in first[2]
    # second start: same identity, the stored token is reused and not printed again
    assert second[0] == first[0]
    assert not any(line.startswith("token:") for line in second)


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "muxtunnel", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM ``proc``; return its exit status and stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    return proc.returncode, err


def test_client_with_ca(tmp_path: Path) -> None:
    """``--ca`` accepts a relay whose certificate chains to it and refuses others (exit 4)."""
    env = clean_env(tmp_path)
    relay_state = tmp_path / "relay"
    lo = random.randrange(30000, 39990, 10)  # other test runs may share this machine
    relay = start(
        [
            "server",
            "--listen",
            "127.0.0.1:0",
            "--bind",
            "127.0.0.1",
            "--ports",
            f"{lo}-{lo + 9}",
            "--token",
            "tok",
            "--state-dir",
            str(relay_state),
        ],
        env,
    )
    try:
        line = read_until(relay, r"^muxtunnel relay listening on ")[-1]
        port = line.rsplit(":", 1)[1]
        # the relay's own self-signed certificate works as a CA file (it names 127.0.0.1)
        client = start(
            [
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--token",
                "tok",
                "--state-dir",
                str(tmp_path / "c1"),
                "--ca",
                str(relay_state / "cert.pem"),
                "9",
            ],
            env,
        )
        try:
            forward = read_until(client, r"^forwarding tcp://")[-1]
        finally:
            code, err = stop(client)
        match = re.fullmatch(r"forwarding tcp://127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:9", forward)
        assert match is not None, forward
        assert lo <= int(match[1]) <= lo + 9
        assert code == 0, err
        assert not (tmp_path / "c1" / "known_hosts").exists()  # CA mode pins nothing

        other = load_or_create_identity(tmp_path / "other")
        refused = mux(
            tmp_path,
            *["client", "--server", f"127.0.0.1:{port}", "--state-dir"],
            *[str(tmp_path / "c2"), "--ca", str(other.cert_path), "9"],
            env={**env, "MUXTUNNEL_TOKEN": "tok"},  # --token would add its warning line
        )
        assert_one_error_line(refused, 4, "certificate verification", "--ca")
    finally:
        code, err = stop(relay)
    assert code == 0, err
