"""The relay's TOML token file: parsing, errors, ``token add``/``list``/``remove`` and its config use."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import stat
from typing import TYPE_CHECKING

import pytest

from muxtunnel import tokenstore
from muxtunnel.access import OPEN_POLICY
from muxtunnel.cli import run
from muxtunnel.config import build_client_config, build_server_config
from muxtunnel.errors import ConfigError
from muxtunnel.protocol.auth import stored_key
from muxtunnel.tokens import token_id
from muxtunnel.tokenstore import (
    KNOWN_KEYS,
    add_token,
    format_rate,
    list_tokens,
    load_token_file,
    parse_rate,
    policy_summary,
    read_tokens,
    remove_token,
    token_json,
)

if TYPE_CHECKING:
    from pathlib import Path

TOKEN = "s3cr3t-token"
HASH = "sha256:" + stored_key(TOKEN).hex()

FULL = f"""\
# muxtunnel tokens: written by `muxtunnel token add`; policy keys are optional
[[token]]
name = "office"
hash = "{HASH}"
created = "2026-11-29T16:50:00Z"
ports = ["2200-2299", 5432]      # ports or ranges it may bind
max_tunnels = 4
max_streams = 100
max_sessions = 2
max_visitors = 50                 # per tunnel
bandwidth = "10M"
tunnel_bandwidth = "2M"
allow = ["203.0.113.0/24", "2001:db8::/32"]
deny = ["203.0.113.66"]
publish = ["ssh-*"]
visit = ["ssh-home"]

# a token kept in clear, for clients that predate stored keys
[[token]]
name = "legacy.box_1"
token = "plain-token-value"
created = 2026-11-29T16:51:00Z
"""


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------
# Parsing


def test_full_example(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens.toml", FULL)
    office, legacy = read_tokens(path)
    entry = office.entry
    assert entry.name == "office"
    assert entry.stored_key == stored_key(TOKEN)
    assert entry.secret is None
    assert office.created == "2026-11-29T16:50:00Z"
    policy = entry.policy
    assert policy.ports == ((2200, 2299), (5432, 5432))
    assert policy.port_allowed(2250)
    assert policy.port_allowed(5432)
    assert not policy.port_allowed(2300)
    assert (policy.max_tunnels, policy.max_streams, policy.max_sessions) == (4, 100, 2)
    assert policy.max_visitors == 50
    assert (policy.bandwidth, policy.tunnel_bandwidth) == (10_000_000, 2_000_000)
    assert policy.visitors.allow == (
        ipaddress.ip_network("203.0.113.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert policy.visitors.refusal("203.0.113.66") == "in the deny list (203.0.113.66/32)"
    assert policy.visitors.refusal("203.0.113.5") is None
    assert policy.publish == ("ssh-*",)
    assert policy.may_publish("ssh-office")
    assert policy.visit == ("ssh-home",)
    assert legacy.entry.name == "legacy.box_1"
    assert legacy.entry.secret == "plain-token-value"
    assert legacy.entry.stored_key == stored_key("plain-token-value")
    assert legacy.entry.policy == OPEN_POLICY
    assert legacy.created == "2026-11-29T16:51:00Z"  # an unquoted TOML date-time
    assert load_token_file(path) == ((), (office.entry, legacy.entry))


def test_minimal_table_has_the_open_policy(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.toml",
        f'[[token]]\nname = "a"\nhash = "{HASH.upper()[:7].lower()}{HASH[7:].upper()}"\n',
    )
    (stored,) = read_tokens(path)
    assert stored.entry.policy == OPEN_POLICY
    assert stored.entry.stored_key == stored_key(TOKEN)
    assert stored.created is None


def test_one_token_per_line_files_keep_working(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", "# comment\nabc-def\nx=1\n\nabc-def\n")
    assert load_token_file(path) == (("abc-def", "x=1"), ())
    stored = read_tokens(path)
    assert [s.entry.name for s in stored] == [token_id("abc-def"), token_id("x=1")]
    assert all(s.plaintext_line for s in stored)
    # Valid TOML without [[token]] tables is still a one-token-per-line file.
    assert load_token_file(write(tmp_path / "toml-like", "x=1\n")) == (("x=1",), ())


def test_group_readable_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "shared.toml", FULL, mode=0o644)
    with caplog.at_level(logging.WARNING):
        read_tokens(path)
    assert f"token file {path} is accessible to other users (mode 0644)" in caplog.text
    assert f"chmod 600 {path}" in caplog.text


TABLE = '[[token]]\nname = "office"\nhash = "' + HASH + '"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            TABLE + "colour = 1\n",
            r"\[\[token\]\] 'office': unknown key 'colour' \(known keys: name, hash, token, created, ports",
        ),
        ('[[token]]\nhash = "' + HASH + '"\n', r"\[\[token\]\] #1: key 'name' is missing"),
        (
            '[[token]]\nname = "-x"\nhash = "' + HASH + '"\n',
            r"\[\[token\]\] #1: key 'name': '-x' is not a valid name",
        ),
        ('[[token]]\nname = "' + "a" * 64 + '"\nhash = "' + HASH + '"\n', r"#1: key 'name'"),
        ("[[token]]\nname = 7\n", r"#1: key 'name': expected a string"),
        ('[[token]]\nname = "a"\n', r"'a': give exactly one of the keys 'hash' and 'token'"),
        (TABLE + 'token = "x"\n', r"'office': give exactly one of the keys 'hash' and 'token'"),
        (
            '[[token]]\nname = "a"\nhash = "md5:00"\n',
            r"'a': key 'hash': expected sha256: and 64 hex digits",
        ),
        (
            '[[token]]\nname = "a"\ntoken = "has space"\n',
            r"'a': key 'token': a token must be non-empty",
        ),
        (TABLE + "created = 5\n", r"'office': key 'created': expected a string"),
        (TABLE + "ports = [0]\n", r"'office': key 'ports': expected ports 1-65535"),
        (TABLE + 'ports = ["70000"]\n', r"key 'ports': expected ports 1-65535"),
        (TABLE + 'ports = ["3-1"]\n', r"key 'ports': empty range 3-1"),
        (TABLE + "ports = []\n", r"key 'ports': give at least one port"),
        (TABLE + "ports = [true]\n", r"key 'ports': expected ports or ranges"),
        (
            TABLE + "max_tunnels = 0\n",
            r"'office': key 'max_tunnels': expected a positive integer, got 0",
        ),
        (TABLE + "max_streams = -1\n", r"key 'max_streams': expected a positive integer"),
        (TABLE + 'max_sessions = "2"\n', r"key 'max_sessions': expected a positive integer"),
        (TABLE + "max_visitors = true\n", r"key 'max_visitors': expected a positive integer"),
        (
            TABLE + 'bandwidth = "10Q"\n',
            r"'office': key 'bandwidth': expected bytes per second like 10M",
        ),
        (TABLE + "tunnel_bandwidth = 0\n", r"key 'tunnel_bandwidth': must be at least 1 byte"),
        (TABLE + 'allow = ["10.0.0.1/8"]\n', r"'office': key 'allow'.*host bits set"),
        (TABLE + 'deny = ["nowhere"]\n', r"key 'deny'.*expected an IPv4 or IPv6"),
        (TABLE + 'publish = ["SSH"]\n', r"'office': key 'publish': expected a tunnel name pattern"),
        (TABLE + "visit = [1]\n", r"key 'visit': expected a tunnel name pattern"),
        (TABLE + "visit = 1\n", r"key 'visit': expected a list of name patterns"),
        (
            TABLE + TABLE.replace(HASH, "sha256:" + "0" * 64),
            r"#2: key 'name': duplicate name 'office' \(also in table #1\)",
        ),
        (
            TABLE + TABLE.replace("office", "other"),
            r"'other': key 'hash': same token as \[\[token\]\] 'office'",
        ),
        ('owner = "me"\n' + TABLE, r"unknown top-level key 'owner'"),
        (TABLE + "ports = [\n", r"invalid TOML"),
    ],
)
def test_errors_name_file_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "tokens.toml", text)
    with pytest.raises(ConfigError, match=message) as info:
        read_tokens(path)
    assert str(info.value).startswith(f"token file {path}: ")


def test_known_keys_are_what_add_can_write() -> None:
    assert KNOWN_KEYS[:4] == ("name", "hash", "token", "created")
    assert set(KNOWN_KEYS) == {
        "name", "hash", "token", "created", "ports", "max_tunnels", "max_streams",
        "max_sessions", "max_visitors", "bandwidth", "tunnel_bandwidth", "allow", "deny",
        "publish", "visit",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("value", "rate"),
    [
        ("10M", 10_000_000),
        ("512k", 512_000),
        ("1G", 10**9),
        ("1.5M", 1_500_000),
        (4096, 4096),
        (" 7 ", 7),
    ],
)
def test_parse_rate(value: object, rate: int) -> None:
    assert parse_rate(value, "bandwidth") == rate


@pytest.mark.parametrize("value", ["", "M", "10MB", "-1", "0", "0.0001K", True, 1.5, None])
def test_parse_rate_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^bandwidth: "):
        parse_rate(value, "bandwidth")


def test_format_rate() -> None:
    assert [format_rate(r) for r in (10**9, 2_000_000, 512_000, 1500, 7)] == [
        "1G", "2M", "512K", "1500", "7"
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# add / list / remove


NOW = dt.datetime(2026, 11, 29, 16, 50, tzinfo=dt.UTC)


def test_add_creates_private_file_and_dir(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sub" / "tokens.toml"
    token = add_token(
        path, "office", ports=["2200-2299,5432"], max_tunnels=4, bandwidth="10M", now=NOW
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert token not in text
    assert len(token) >= 43
    assert text == (
        tokenstore.HEADER
        + "[[token]]\n"
        + 'name = "office"\n'
        + f'hash = "sha256:{stored_key(token).hex()}"\n'
        + 'created = "2026-11-29T16:50:00Z"\n'
        + 'ports = ["2200-2299", 5432]\n'
        + "max_tunnels = 4\n"
        + 'bandwidth = "10M"\n'
    )
    ((_, (entry,))) = load_token_file(path)
    assert entry.stored_key == stored_key(token)
    assert entry.policy.ports == ((2200, 2299), (5432, 5432))
    assert leftovers(path.parent) == []


def test_add_every_policy_key_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    add_token(
        path,
        "all",
        ports=[5432, "2200-2299"],
        max_tunnels=4,
        max_streams=100,
        max_sessions=2,
        max_visitors=50,
        bandwidth=1_500_000,
        tunnel_bandwidth="2M",
        allow=["203.0.113.0/24", "2001:db8::/32"],
        deny=["203.0.113.66"],
        publish=["ssh-*"],
        visit=["ssh-home"],
        now=NOW,
    )
    text = path.read_text()
    assert 'deny = ["203.0.113.66"]\n' in text
    assert 'bandwidth = "1500K"\n' in text
    (stored,) = list_tokens(path)
    policy = stored.entry.policy
    assert policy.ports == ((5432, 5432), (2200, 2299))
    assert (policy.max_streams, policy.max_visitors, policy.bandwidth) == (100, 50, 1_500_000)
    assert policy.visit == ("ssh-home",)
    assert stored.created == "2026-11-29T16:50:00Z"


def test_add_keeps_existing_text_and_comments(tmp_path: Path) -> None:
    original = "# my tokens, edited by hand\n\n" + FULL + "# trailing note"  # no final newline
    path = write(tmp_path / "tokens.toml", original, mode=0o644)
    token = add_token(path, "home", now=NOW)
    text = path.read_text()
    assert text.startswith(original + "\n\n[[token]]\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the replacement is private
    assert [s.entry.name for s in list_tokens(path)] == ["office", "legacy.box_1", "home"]
    assert list_tokens(path)[-1].entry.stored_key == stored_key(token)


def test_add_refuses_duplicates_bad_values_and_line_files(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens.toml", FULL)
    with pytest.raises(ConfigError, match="a token named 'office' exists already"):
        add_token(path, "office")
    with pytest.raises(ConfigError, match="token name 'no/slash'"):
        add_token(path, "no/slash")
    with pytest.raises(ConfigError, match="token 'x': ports: empty range"):
        add_token(path, "x", ports=["9-1"])
    with pytest.raises(ConfigError, match="token 'x': key 'max_tunnels': expected a positive"):
        add_token(path, "x", max_tunnels=0)
    with pytest.raises(ConfigError, match=r"token 'x': allow '10.0.0.1/8': host bits set"):
        add_token(path, "x", allow=["10.0.0.1/8"])
    with pytest.raises(ConfigError, match="key 'publish': expected a tunnel name pattern"):
        add_token(path, "x", publish=["Bad Pattern"])
    assert path.read_text() == FULL
    lines = write(tmp_path / "plain", "abc\n")
    with pytest.raises(ConfigError, match="holds tokens one per line"):
        add_token(lines, "x")
    assert lines.read_text() == "abc\n"
    assert leftovers(tmp_path) == []


def test_add_to_a_file_with_only_comments(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens.toml", "# nothing yet\n")
    add_token(path, "a")
    assert path.read_text().startswith('# nothing yet\n\n[[token]]\nname = "a"\n')


def test_add_through_a_symlink_updates_its_target(tmp_path: Path) -> None:
    target = write(tmp_path / "real.toml", FULL)
    link = tmp_path / "tokens.toml"
    link.symlink_to(target)
    add_token(link, "home")
    assert link.is_symlink()
    assert 'name = "home"' in target.read_text()


def test_failed_write_leaves_the_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "tokens.toml", FULL)

    def broken(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(ConfigError, match=f"token file {path}: cannot write: No space left"):
        add_token(path, "home")
    with pytest.raises(ConfigError, match="cannot write"):
        remove_token(path, "office")
    assert path.read_text() == FULL
    assert leftovers(tmp_path) == []


def test_remove_keeps_every_other_line(tmp_path: Path) -> None:
    text = (
        "# header comment\n"
        "\n"
        "[[token]]\n"
        'name = "a"\n'
        f'hash = "{HASH}"\n'
        "\n"
        "# b is the office laptop\n"
        "[[token]]\n"
        'name = "b"  # inline\n'
        "# a comment inside b\n"
        'token = "b-token"\n'
        "max_tunnels = 2\n"
        "\n"
        "# c comes next\n"
        "[[token]]\n"
        'name = "c"\n'
        'token = "c-token"\n'
        "# last line\n"
    )
    path = write(tmp_path / "tokens.toml", text, mode=0o640)
    remove_token(path, "b")
    assert path.read_text() == (
        "# header comment\n"
        "\n"
        "[[token]]\n"
        'name = "a"\n'
        f'hash = "{HASH}"\n'
        "\n"
        "# b is the office laptop\n"
        "\n"
        "# c comes next\n"
        "[[token]]\n"
        'name = "c"\n'
        'token = "c-token"\n'
        "# last line\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    remove_token(path, "c")
    assert path.read_text().endswith(
        f'hash = "{HASH}"\n\n# b is the office laptop\n\n# c comes next\n# last line\n'
    )
    remove_token(path, "a")
    assert "[[token]]" not in path.read_text()
    assert path.read_text().startswith("# header comment\n")
    assert list_tokens(path) == ()
    assert leftovers(tmp_path) == []


def test_add_then_remove_restores_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    add_token(path, "a", now=NOW)
    first = path.read_text()
    add_token(path, "b", ports=[2222], now=NOW)
    add_token(path, "c", now=NOW)
    remove_token(path, "b")
    remove_token(path, "c")
    assert path.read_text() == first
    add_token(path, "b", now=NOW)
    remove_token(path, "a")
    assert path.read_text().startswith(tokenstore.HEADER + '\n[[token]]\nname = "b"\n')


def test_remove_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens.toml", FULL)
    with pytest.raises(
        ConfigError, match=r"no token named 'nope' \(it has: office, legacy.box_1\)"
    ):
        remove_token(path, "nope")
    with pytest.raises(ConfigError, match="does not exist"):
        remove_token(tmp_path / "missing.toml", "office")
    inline = write(tmp_path / "inline.toml", f'token = [{{name = "a", hash = "{HASH}"}}]\n')
    with pytest.raises(ConfigError, match="edit the file by hand"):
        remove_token(inline, "a")
    assert inline.read_text().startswith("token = [")
    assert path.read_text() == FULL


def test_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist .*muxtunnel token add NAME"):
        list_tokens(tmp_path / "missing.toml")
    empty = write(tmp_path / "empty.toml", "# none\n\n")
    assert list_tokens(empty) == ()
    office, legacy = list_tokens(write(tmp_path / "tokens.toml", FULL))
    summary = policy_summary(office.entry.policy)
    assert summary == (
        "ports 2200-2299,5432; tunnels 4; streams 100; sessions 2; visitors/tunnel 50; "
        "bandwidth 10MB/s; bandwidth/tunnel 2MB/s; allow 203.0.113.0/24,2001:db8::/32; "
        "deny 203.0.113.66; publish ssh-*; visit ssh-home"
    )
    assert policy_summary(legacy.entry.policy) == "no limits"
    data = token_json(office)
    assert data["name"] == "office"
    assert data["plaintext"] is False
    assert data["ports"] == ["2200-2299", 5432]
    assert token_json(legacy)["plaintext"] is True
    dumped = json.dumps([token_json(office), token_json(legacy)])
    assert stored_key(TOKEN).hex() not in dumped
    assert "plain-token-value" not in dumped


# --------------------------------------------------------------------------------------------
# Configuration and the command line


def test_server_token_file_in_either_format(tmp_path: Path) -> None:
    named = write(tmp_path / "tokens.toml", FULL)
    cfg = build_server_config({}, {"token-file": named}, env={})
    assert cfg.tokens == ()
    assert [e.name for e in cfg.token_entries] == ["office", "legacy.box_1"]
    assert [e.name for e in cfg.accepted_tokens()] == ["office", "legacy.box_1"]
    lines = write(tmp_path / "tokens", "abc\n")
    cfg = build_server_config({}, {"token-file": lines, "token": ["xyz"]}, env={})
    assert (cfg.tokens, cfg.token_entries) == (("xyz", "abc"), ())
    cfg = build_server_config({"token-file": str(named)}, {}, env={})
    assert len(cfg.token_entries) == 2
    with pytest.raises(ConfigError, match="configured twice"):
        build_server_config({}, {"token-file": named, "token": ["plain-token-value"]}, env={})


def test_server_config_rejects_a_clash(tmp_path: Path) -> None:
    named = write(
        tmp_path / "tokens.toml", f'[[token]]\nname = "{token_id("abc")}"\nhash = "{HASH}"\n'
    )
    with pytest.raises(ConfigError, match="used by two tokens"):
        build_server_config({}, {"token-file": named, "token": ["abc"]}, env={})


def test_client_refuses_the_relays_token_file(tmp_path: Path) -> None:
    named = write(tmp_path / "tokens.toml", FULL)
    with pytest.raises(
        ConfigError, match=r"is a relay's token file .* `muxtunnel token add` prints"
    ):
        build_client_config({}, {"server": "r", "token-file": named, "tunnel": ["80"]}, env={})


def cli(*args: str) -> int:
    return run([*args])


def test_cli_add_list_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert (
        cli(
            "token",
            "add",
            "office",
            "--state-dir",
            str(state),
            "--ports",
            "2200-2299",
            "--max-tunnels",
            "4",
            "--allow",
            "203.0.113.0/24",
        )
        == 0
    )
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n"
    assert token not in err
    assert "MUXTUNNEL_TOKEN=" in err
    assert "restart" in err
    path = state / "tokens.toml"
    assert list_tokens(path)[0].entry.stored_key == stored_key(token)

    assert cli("token", "list", "--state-dir", str(state)) == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "CREATED", "POLICY"]
    assert lines[1].startswith("office ")
    assert "ports 2200-2299; tunnels 4; allow 203.0.113.0/24" in lines[1]
    assert cli("token", "list", "--file", str(path), "--json") == 0
    out, _ = capsys.readouterr()
    assert [t["name"] for t in json.loads(out)] == ["office"]
    for secret in (token, stored_key(token).hex(), stored_key(token).hex()[:16]):
        assert secret not in out

    assert cli("token", "add", "office", "--state-dir", str(state)) == 2
    _, err = capsys.readouterr()
    assert err.startswith("muxtunnel: error: token file ")
    assert "exists already" in err
    assert err.count("\n") == 1
    assert cli("token", "remove", "office", "--file", str(path)) == 0
    _, err = capsys.readouterr()
    assert "removed" in err
    assert "restart" in err
    assert cli("token", "remove", "office", "--file", str(path)) == 2
    _, err = capsys.readouterr()
    assert "no token named 'office'" in err
    assert cli("token", "list", "--file", str(path), "--state-dir", str(state)) == 2
    _, err = capsys.readouterr()
    assert "either --file or --state-dir" in err


def test_remove_refuses_a_layout_it_cannot_edit_safely(tmp_path: Path) -> None:
    """A line that looks like a table header inside a multi-line string is not one."""
    text = '[[token]]\nname = "a"\ntoken = "a-token"\ncreated = """\n[not a table]\n"""\n' + TABLE
    path = write(tmp_path / "tokens.toml", text)
    assert [s.entry.name for s in list_tokens(path)] == ["a", "office"]
    with pytest.raises(ConfigError, match="cannot find the lines of token 'a' safely"):
        remove_token(path, "a")
    assert path.read_text() == text


def test_unreadable_files(tmp_path: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[[token]]\n")
    with pytest.raises(ConfigError, match=f"token file {binary}: cannot read"):
        read_tokens(binary)
    with pytest.raises(ConfigError, match=f"token file {tmp_path}: cannot read"):
        list_tokens(tmp_path)  # a directory
    with pytest.raises(ConfigError, match="cannot read"):
        build_client_config(
            {}, {"server": "r", "token-file": tmp_path / "missing", "tunnel": ["80"]}, env={}
        )


@pytest.mark.parametrize(
    "header",
    ["[[token]", "[token]", "[[tokens]]", "[[token]] ]"],
    ids=["half", "single", "plural", "junk"],
)
def test_a_broken_table_header_is_an_error_never_a_token(tmp_path: Path, header: str) -> None:
    """A typo in a named file must not turn it into a one-token-per-line file that accepts
    the header line as a token (and drops every named token)."""
    path = tmp_path / "tokens.toml"
    path.write_text(f'{header}\nname = "office"\nhash = "sha256:{"0" * 64}"\n')
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=r"token file .*tokens\.toml"):
        tokenstore.read_tokens(path)
