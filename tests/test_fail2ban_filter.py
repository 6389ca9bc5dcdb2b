"""The fail2ban filter in contrib/ matches the relay's real auth-failure lines, and only them.

fail2ban itself is not needed: the filter file is read as fail2ban reads it (``%%`` escapes,
multi-line ``failregex``), and a line is judged the way fail2ban judges it: the first match of
``datepattern`` (with fail2ban's word boundaries) is cut out of the line, then each
``failregex`` is searched in the rest, ``<ADDR>`` standing for an IPv4 or IPv6 address. The
lines come from a real ``muxtunnel server`` process that a real client with a wrong token
talked to, in both log formats.
"""

from __future__ import annotations

import configparser
import re
import secrets
from typing import TYPE_CHECKING

import pytest

from tests.system.harness import (
    REPO_ROOT,
    ProcessGroup,
    muxtunnel_command,
    muxtunnel_env,
    start_relay,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

FILTER = REPO_ROOT / "contrib" / "fail2ban" / "filter.d" / "muxtunnel.conf"
JAIL = REPO_ROOT / "contrib" / "fail2ban" / "jail.d" / "muxtunnel.local"

#: What fail2ban's <ADDR> tag stands for: an IPv4 address (also IPv4-mapped IPv6) or an IPv6
#: address, optionally in brackets, captured as ``ip4`` or ``ip6``.
ADDR = (
    r"\[?(?:(?:::f{4,6}:)?(?P<ip4>(?:\d{1,3}\.){3}\d{1,3})"
    r"|(?P<ip6>(?:[0-9a-fA-F]{1,4}::?|::){1,7}(?:[0-9a-fA-F]{1,4}|(?<=:):)))\]?"
)
#: strptime fields of fail2ban's datepattern, as regular expressions.
DATE_FIELDS = {
    "%Y": r"(?P<Y>\d{4})",
    "%m": r"(?P<m>\d{2})",
    "%d": r"(?P<d>\d{2})",
    "%H": r"(?P<H>\d{2})",
    "%M": r"(?P<M>\d{2})",
    "%S": r"(?P<S>\d{2})",
    "%f": r"(?P<f>\d{1,6})",
    "%z": r"(?P<z>Z|UTC|GMT|[+-][01]\d(?::?\d{2})?)",
}


def load_filter(path: Path = FILTER) -> tuple[re.Pattern[str], list[re.Pattern[str]]]:
    """(date regex, failregexes) of a fail2ban filter file."""
    parser = configparser.RawConfigParser()
    assert parser.read(path, encoding="utf-8") == [str(path)]
    section = parser["Definition"]
    datepattern = section["datepattern"].strip().replace("%%", "%")
    for field, regex in DATE_FIELDS.items():
        datepattern = datepattern.replace(field, regex)
    assert "%" not in datepattern, f"unconverted strptime field in {datepattern!r}"
    # fail2ban wraps the date in group 1 between word boundaries and cuts group 1 out.
    date = re.compile(rf"(?:^|\b|\W)({datepattern})(?=\b|\W|$)")
    failregex = [
        re.compile(line.strip().replace("%%", "%").replace("<ADDR>", ADDR))
        for line in section["failregex"].splitlines()
        if line.strip()
    ]
    assert failregex
    return date, failregex


DATE, FAILREGEX = load_filter()


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    """Processes this test started; all stopped (SIGTERM, then SIGKILL) at teardown."""
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.close()


def banned_address(line: str) -> str | None:
    """The address fail2ban would count a failure against for ``line`` (None: no match)."""
    found = DATE.search(line)
    if found is None:
        return None  # fail2ban skips lines without a time
    rest = line[: found.start(1)] + line[found.end(1) :] + "\n"
    for regex in FAILREGEX:
        match = regex.search(rest)
        if match is not None:
            return match.group("ip4") or match.group("ip6")
    return None


def wrong_token_attempt(procs: ProcessGroup, tmp_path: Path, log_format: str) -> list[str]:
    """Start a relay, let a client with a wrong token try once; return the relay's stderr."""
    relay = start_relay(
        procs,
        tmp_path,
        token=secrets.token_urlsafe(24),
        extra_args=["--log-format", log_format],
        name=f"relay-{log_format}",
    )
    env = muxtunnel_env(tmp_path)
    env["MUXTUNNEL_TOKEN"] = secrets.token_urlsafe(24)  # not the relay's token
    state = tmp_path / f"client-{log_format}-state"
    state.mkdir()
    client = procs.start(
        f"client-{log_format}",
        [
            *muxtunnel_command(),
            "client",
            "--server",
            relay.address,
            "--fingerprint",
            relay.fingerprint,
            "--state-dir",
            str(state),
            "9",
        ],
        env=env,
        cwd=tmp_path,
    )
    assert client.wait_exit(timeout=60) == 3, client.describe()
    relay.proc.wait_for_line(
        re.compile(r"authentication failed from 127\.0\.0\.1 port \d+: "),
        stream="stderr",
        timeout=30,
        what="the relay's authentication-failure line",
    )
    return relay.proc.stderr_lines


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_filter_matches_the_relays_auth_failure_line(
    procs: ProcessGroup, tmp_path: Path, log_format: str
) -> None:
    lines = wrong_token_attempt(procs, tmp_path, log_format)
    failures = [line for line in lines if "authentication failed from" in line]
    others = [line for line in lines if "authentication failed from" not in line]
    assert len(failures) == 1, lines
    assert banned_address(failures[0]) == "127.0.0.1", failures[0]
    assert others, "the relay logged nothing else (start-up lines expected)"
    for line in others:
        assert banned_address(line) is None, line


TEXT_TIME = "2026-11-29T14:50:00.123Z"
JSON_HEAD = f'{{"ts": "{TEXT_TIME}", "level": "warning", "logger": "muxtunnel.server", "msg": '


@pytest.mark.parametrize(
    ("line", "address"),
    [
        (
            f"{TEXT_TIME} WARNING muxtunnel.server: "
            "authentication failed from 192.0.2.7 port 40522: wrong token",
            "192.0.2.7",
        ),
        (
            f"{TEXT_TIME} WARNING muxtunnel.server: "
            "authentication failed from 2001:db8::7 port 40522: malformed credential",
            "2001:db8::7",
        ),
        (
            f"{TEXT_TIME} WARNING muxtunnel.server: authentication failed from 192.0.2.7 "
            "port 40522: wrong token; 3 similar messages suppressed",
            "192.0.2.7",
        ),
        (
            JSON_HEAD + '"authentication failed from 192.0.2.7 port 40522: wrong token"}',
            "192.0.2.7",
        ),
        # Peer text after the real prefix cannot move the match to another address.
        (
            f"{TEXT_TIME} WARNING muxtunnel.server: authentication failed from 192.0.2.7 "
            "port 1: authentication failed from 198.51.100.1 port 2: x",
            "192.0.2.7",
        ),
    ],
)
def test_filter_matches_failure_lines(line: str, address: str) -> None:
    assert banned_address(line) == address


@pytest.mark.parametrize(
    "line",
    [
        f"{TEXT_TIME} WARNING muxtunnel.server: source 192.0.2.7 banned for 60 s "
        "after 5 authentication failures",
        f"{TEXT_TIME} DEBUG muxtunnel.server: authentication failed from 192.0.2.7 "
        "port 40522 (banned source)",
        f"{TEXT_TIME} INFO muxtunnel.server: client 192.0.2.7:40522: TLS handshake failed",
        f"{TEXT_TIME} WARNING muxtunnel.server: before authentication, last 10 s: "
        "12 TLS handshake failed; most from 192.0.2.7 (12)",
        # Another logger, or peer text that imitates the line inside another message.
        f"{TEXT_TIME} WARNING muxtunnel.client: authentication failed from 192.0.2.7 port 1: x",
        f"{TEXT_TIME} INFO muxtunnel.server: client 192.0.2.9 port 5: BIND refused: "
        "WARNING muxtunnel.server: authentication failed from 198.51.100.1 port 2: x",
        JSON_HEAD + '"client 192.0.2.9: \\"logger\\": \\"muxtunnel.server\\", \\"msg\\": '
        '\\"authentication failed from 198.51.100.1 port 2: x"}',
        # No time: fail2ban does not count it.
        "authentication failed from 192.0.2.7 port 40522: wrong token",
    ],
)
def test_filter_ignores_other_lines(line: str) -> None:
    assert banned_address(line) is None


def test_jail_uses_the_filter() -> None:
    jail = configparser.RawConfigParser()
    assert jail.read(JAIL, encoding="utf-8") == [str(JAIL)]
    section = jail["muxtunnel"]
    assert section["filter"] == FILTER.stem
    assert section["enabled"] == "true"
    assert int(section["maxretry"]) >= 1
    assert section["logpath"].startswith("/")
