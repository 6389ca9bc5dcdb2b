"""Config parsing: tunnel specs, TOML files, flag merging, tokens, logging setup."""

from __future__ import annotations

import io
import json
import logging
import stat
import sys
from typing import TYPE_CHECKING

import pytest

from muxtunnel.config import (
    ClientConfig,
    ServerConfig,
    TunnelSpec,
    build_client_config,
    build_server_config,
    default_state_dir,
    load_toml,
    parse_host_port,
    parse_port_range,
)
from muxtunnel.errors import ConfigError, ExitCode
from muxtunnel.logsetup import configure_logging
from muxtunnel.tokens import load_or_create_token, read_token_file

if TYPE_CHECKING:
    from pathlib import Path

FP = "sha256:" + "ab" * 32

# --------------------------------------------------------------------------------------------
# TunnelSpec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("22", TunnelSpec(local_port=22)),
        ("2222:22", TunnelSpec(local_port=22, remote_port=2222)),
        ("0:22", TunnelSpec(local_port=22, remote_port=0)),
        ("localhost:22", TunnelSpec(local_port=22, local_host="localhost")),
        (
            "25432:db.internal:5432",
            TunnelSpec(local_port=5432, remote_port=25432, local_host="db.internal"),
        ),
        ("10.0.0.5:80", TunnelSpec(local_port=80, local_host="10.0.0.5")),
        ("8080:[::1]:80", TunnelSpec(local_port=80, remote_port=8080, local_host="::1")),
        ("[2001:DB8::1]:443", TunnelSpec(local_port=443, local_host="2001:db8::1")),
        (" 65535:1 ", TunnelSpec(local_port=1, remote_port=65535)),
    ],
)
def test_tunnel_spec_parse(text: str, expected: TunnelSpec) -> None:
    assert TunnelSpec.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected [REMOTE_PORT:][LOCAL_HOST:]LOCAL_PORT"),
        ("abc", "expected [REMOTE_PORT:][LOCAL_HOST:]LOCAL_PORT"),
        ("0", "port 0 out of range 1-65535"),
        ("70000", "port 70000 out of range"),
        ("70000:22", "port 70000 out of range 0-65535"),
        ("::1:22", "put IPv6 addresses in brackets"),
        ("80:[::1:80", "expected"),
        ("[1.2.3.4]:5", "is not an IPv6 address"),
        ("1:2:3", "invalid host '2'"),
        ("1:bad_host!:3", "invalid host 'bad_host!'"),
        ("-1:22", "invalid host '-1'"),
    ],
)
def test_tunnel_spec_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=r"^tunnel ") as info:
        TunnelSpec.parse(text)
    assert fragment in str(info.value)
    assert info.value.exit_code == ExitCode.USAGE


def test_tunnel_spec_str_round_trips() -> None:
    for text in ("22", "2222:localhost:22", "8080:[::1]:80"):
        spec = TunnelSpec.parse(text)
        assert TunnelSpec.parse(str(spec)) == spec


def test_host_port_and_ranges() -> None:
    assert parse_host_port("relay.example.com:7000", "x") == ("relay.example.com", 7000)
    assert parse_host_port("[::1]:7000", "x") == ("::1", 7000)
    assert parse_host_port("relay", "x", default_port=7835) == ("relay", 7835)
    assert parse_host_port("[::1]", "x", default_port=7835) == ("::1", 7835)
    assert parse_host_port("::1", "x", default_port=7835) == ("::1", 7835)
    for bad in ("relay", "relay:0", "relay:x", "[::1", "[::1]x", ":1:2:3:x"):
        with pytest.raises(ConfigError, match=r"^x: "):
            parse_host_port(bad, "x")
    assert parse_port_range("20000-20010", "ports") == (20000, 20010)
    assert parse_port_range("5000", "ports") == (5000, 5000)
    assert parse_port_range([1, 2], "ports") == (1, 2)
    for bad_range in ("2-1", "1-2-3", "0-10", "a-b", [1], 7, [True, 2]):
        with pytest.raises(ConfigError, match=r"^ports: "):
            parse_port_range(bad_range, "ports")


# --------------------------------------------------------------------------------------------
# Defaults and state dir


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "muxtunnel"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "muxtunnel"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "muxtunnel"


def test_server_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cfg = build_server_config({}, {}, env={})
    assert cfg == ServerConfig(state_dir=tmp_path / "muxtunnel", admin="auto")
    assert (cfg.listen_host, cfg.listen_port, cfg.port_range, cfg.bind_host) == (
        "0.0.0.0",
        7835,
        (20000, 29999),
        "0.0.0.0",
    )
    assert cfg.tokens == ()


# --------------------------------------------------------------------------------------------
# TOML files and merging


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_server_file_and_flags(tmp_path: Path) -> None:
    state = tmp_path / "st"
    path = write(
        tmp_path / "relay.toml",
        f"""
listen = "127.0.0.1:9000"
ports = "30000-30100"
bind = "127.0.0.1"
token = ["t1", "t2"]
state_dir = "{state}"
drain-timeout = 2.5
max_tunnels_per_client = 8
lease = 5

[client]
server = "ignored.example:1"
""",
    )
    values = load_toml(path, "server")
    cfg = build_server_config(values, {}, config_path=path, env={"MUXTUNNEL_TOKEN": "env"})
    assert cfg.listen_host == "127.0.0.1"
    assert cfg.listen_port == 9000
    assert cfg.port_range == (30000, 30100)
    assert cfg.bind_host == "127.0.0.1"
    # MUXTUNNEL_TOKEN beats the file, flags beat both
    assert cfg.tokens == ("env",)
    assert build_server_config(values, {}, config_path=path, env={}).tokens == ("t1", "t2")
    assert cfg.state_dir == tmp_path / "st"
    assert cfg.drain_timeout == 2.5
    assert cfg.max_tunnels_per_client == 8
    assert cfg.lease_seconds == 5.0
    flags: dict[str, object] = {
        "listen": "[::1]:9001",
        "ports": "40000-40000",
        "token": ["flag"],
        "drain-timeout": None,
    }
    cfg2 = build_server_config(values, flags, config_path=path, env={"MUXTUNNEL_TOKEN": "env"})
    assert (cfg2.listen_host, cfg2.listen_port, cfg2.port_range) == ("::1", 9001, (40000, 40000))
    assert cfg2.tokens == ("flag",)
    assert cfg2.drain_timeout == 2.5  # None means "flag not given"


def test_server_section_table_overrides_top_level(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'listen = "127.0.0.1:1"\n[server]\nlisten = "127.0.0.1:2"\n')
    assert load_toml(path, "server") == {"listen": "127.0.0.1:2"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('listne = "0.0.0.0:1"\n', "unknown key 'listne'"),
        ("[server]\nfoo_bar = 1\n", "unknown key 'server.foo_bar'"),
        ("listen = \n", "invalid TOML"),
        ('server = "x"\n', "unknown key 'server'"),
    ],
)
def test_server_file_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=f"^config file {path}: ") as info:
        load_toml(path, "server")
    assert fragment in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_toml(tmp_path / "nope.toml", "client")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('listen = "nohost"\n', "key 'listen': expected HOST:PORT"),
        ("listen = 7835\n", "key 'listen': expected a non-empty string"),
        ('ports = "9-1"\n', "key 'ports': empty range 9-1"),
        ("drain_timeout = -1\n", "key 'drain-timeout': expected a positive number"),
        ('drain_timeout = "10s"\n', "key 'drain-timeout': expected a number of seconds"),
        ("keepalive_timeout = true\n", "key 'keepalive-timeout': expected a number"),
        ("max_tunnels_per_client = 0\n", "key 'max-tunnels-per-client': expected an integer >= 1"),
        ("max_tunnels_per_client = 1.5\n", "key 'max-tunnels-per-client': expected an integer"),
        ('bind = "not a host"\n', "key 'bind': invalid host"),
        ('token = ""\n', "key 'token': a token must be non-empty"),
        ('token = "has space"\n', "key 'token': a token must be non-empty"),
        ('cert = "c.pem"\n', "key 'cert': --cert needs --key too"),
    ],
)
def test_server_bad_values_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    values = load_toml(path, "server")
    with pytest.raises(ConfigError, match=f"^config file {path}: ") as info:
        build_server_config(values, {}, config_path=path, env={})
    assert fragment in str(info.value)


def test_listen_port_zero_is_ephemeral() -> None:
    cfg = build_server_config({}, {"listen": "127.0.0.1:0"}, env={})
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="out of range 1-65535"):
        build_client_config({}, {"server": "r:0", "token": ["t"], "tunnel": ["1"]}, env={})


def test_bad_flag_value_names_the_option() -> None:
    with pytest.raises(ConfigError, match=r"^option --listen: expected HOST:PORT"):
        build_server_config({}, {"listen": "7835"}, env={})
    with pytest.raises(ConfigError, match=r"^option --ports: "):
        build_server_config({}, {"ports": "1-70000"}, env={})


def test_token_file_and_env(tmp_path: Path) -> None:
    tf = write(tmp_path / "tokens", "# relay tokens\n\n alpha \nbeta\nalpha\n")
    assert read_token_file(tf) == ("alpha", "beta")
    cfg = build_server_config(
        {}, {"token": ["x"], "token-file": tf}, env={"MUXTUNNEL_TOKEN": "env"}
    )
    assert cfg.tokens == ("x", "alpha", "beta")
    assert build_server_config({}, {}, env={"MUXTUNNEL_TOKEN": " env "}).tokens == ("env",)
    empty = write(tmp_path / "empty", "# nothing\n\n")
    with pytest.raises(ConfigError, match="contains no token"):
        read_token_file(empty)
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(tmp_path / "missing")
    with pytest.raises(ConfigError, match="whitespace"):
        read_token_file(write(tmp_path / "sp", "a b\n"))


def test_generated_token_is_private_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    token, created = load_or_create_token(state)
    assert created
    assert len(token) >= 43
    path = state / "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert load_or_create_token(state) == (token, False)
    assert read_token_file(path) == (token,)


# --------------------------------------------------------------------------------------------
# Client


def test_client_file_and_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path / "client.toml",
        f"""
server = "relay.example.com"
token = "secret"
fingerprint = "{FP.upper()}"
max_retries = 3

[[tunnel]]
remote_port = 2222
local_port = 22

[[tunnel]]
local_host = "db.lan"
local-port = 5432
""",
    )
    values = load_toml(path, "client")
    cfg = build_client_config(values, {}, config_path=path, env={})
    assert isinstance(cfg, ClientConfig)
    assert (cfg.server_host, cfg.server_port, cfg.server_key) == (
        "relay.example.com",
        7835,
        "relay.example.com:7835",
    )
    assert cfg.token == "secret"
    assert cfg.fingerprint == FP
    assert cfg.max_retries == 3
    assert cfg.tunnels == (
        TunnelSpec(local_port=22, remote_port=2222),
        TunnelSpec(local_port=5432, local_host="db.lan"),
    )
    flags: dict[str, object] = {
        "server": "[::1]:9000",
        "token": ["flagtok"],
        "tunnel": ["80"],
        "fingerprint": None,
    }
    cfg2 = build_client_config(values, flags, config_path=path, env={"MUXTUNNEL_TOKEN": "envtok"})
    assert (cfg2.server_host, cfg2.server_port, cfg2.server_key) == ("::1", 9000, "[::1]:9000")
    assert cfg2.token == "flagtok"
    assert cfg2.tunnels == (TunnelSpec(local_port=80),)
    cfg3 = build_client_config(values, {}, config_path=path, env={"MUXTUNNEL_TOKEN": "envtok"})
    assert cfg3.token == "envtok"


@pytest.mark.parametrize(
    ("text", "flags", "fragment"),
    [
        ("", {"token": ["t"], "tunnel": ["22"]}, "missing --server"),
        ('server = "r"\n', {"tunnel": ["22"]}, "missing token"),
        ('server = "r"\ntoken = "t"\n', {}, "no tunnels"),
        ('server = "r:x"\ntoken = "t"\n', {"tunnel": ["22"]}, "key 'server': invalid port"),
        (
            'server = "r"\ntoken = "t"\nfingerprint = "sha256:12"\n',
            {"tunnel": ["22"]},
            "key 'fingerprint': ",
        ),
        (
            f'server = "r"\ntoken = "t"\nfingerprint = "{FP}"\nca = "ca.pem"\n',
            {"tunnel": ["22"]},
            "either a pinned fingerprint or a CA",
        ),
        (
            'server = "r"\ntoken = "t"\n[[tunnel]]\nremote_port = 1\n',
            {},
            "missing key 'local_port'",
        ),
        (
            'server = "r"\ntoken = "t"\n[[tunnel]]\nlocal_port = 1\nlocal = 2\n',
            {},
            "unknown key 'local'",
        ),
        (
            'server = "r"\ntoken = "t"\n[[tunnel]]\nlocal_port = "22"\n',
            {},
            "key 'local_port': expected an integer",
        ),
        (
            'server = "r"\ntoken = "t"\n[[tunnel]]\nlocal_port = 99999\n',
            {},
            "key 'local_port': port 99999",
        ),
        ('server = "r"\ntoken = "t"\ntunnel = "22"\n', {}, "key 'tunnel': expected a list"),
        ('server = "r"\ntoken = "t"\ntunnel = [1]\n', {}, "expected a table"),
        (
            'server = "r"\ntoken = "t"\nmax_retries = -1\n',
            {"tunnel": ["22"]},
            "key 'max-retries': expected an integer >= 0",
        ),
        ('server = "r"\nlisten = "x:1"\n', {}, "unknown key 'listen'"),
    ],
)
def test_client_errors(tmp_path: Path, text: str, flags: dict[str, object], fragment: str) -> None:
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        build_client_config(load_toml(path, "client"), flags, config_path=path, env={})
    assert fragment in str(info.value)


def test_one_file_for_both_commands(tmp_path: Path) -> None:
    path = write(
        tmp_path / "both.toml",
        'log_level = "debug"\n[server]\nlisten = "127.0.0.1:1"\n[client]\nserver = "127.0.0.1:1"\ntoken = "t"\n'
        "[[client.tunnel]]\nlocal_port = 22\n",
    )
    assert load_toml(path, "server") == {"log-level": "debug", "listen": "127.0.0.1:1"}
    client = load_toml(path, "client")
    cfg = build_client_config(client, {}, config_path=path, env={})
    assert cfg.tunnels == (TunnelSpec(local_port=22),)


def test_client_bad_spec_flag() -> None:
    with pytest.raises(ConfigError, match=r"^tunnel '2222:'"):
        build_client_config({}, {"server": "r", "token": ["t"], "tunnel": ["2222:"]}, env={})


# --------------------------------------------------------------------------------------------
# Logging


def test_log_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    try:
        configure_logging("info", "json")
        logging.getLogger("muxtunnel.test").info("hello %s", "world")
        logging.getLogger("muxtunnel.test").debug("hidden")
        configure_logging("debug", "text")
        logging.getLogger("muxtunnel.test").debug("plain")
    finally:
        for handler in root.handlers[:]:
            if handler not in saved[1]:
                root.removeHandler(handler)
        root.setLevel(saved[0])
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    obj = json.loads(lines[0])
    assert set(obj) == {"ts", "level", "logger", "msg"}
    assert (obj["level"], obj["logger"], obj["msg"]) == ("info", "muxtunnel.test", "hello world")
    assert obj["ts"].endswith("Z")
    assert lines[1].endswith("DEBUG muxtunnel.test: plain")
    with pytest.raises(ConfigError, match="--log-level"):
        configure_logging("loud", "text")
    with pytest.raises(ConfigError, match="--log-format"):
        configure_logging("info", "xml")
