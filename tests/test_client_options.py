"""Client tunnel options: ``--allow``/``--deny``/``--proxy-protocol`` and their TOML keys,
the BIND options they put on the wire, and the refusal to bind them on a relay that is too old."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel import cli
from muxtunnel.access import AddressRule
from muxtunnel.config import TunnelSpec, build_client_config, load_toml
from muxtunnel.errors import ConfigError, ExitCode, TunnelError
from tests.conftest import echo_roundtrip, start_client, start_relay, start_service

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

BASE: dict[str, object] = {"server": "relay.example:7835", "token": ["t0ken"], "state-dir": "/x"}


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


# --------------------------------------------------------------------------------------------
# Parsing


def test_flags_apply_to_every_spec_on_the_command_line() -> None:
    config = build_client_config(
        {},
        {
            **BASE,
            "tunnel": ["22", "8080:80"],
            "allow": ["203.0.113.0/24", "[2001:db8::]/32", "192.0.2.7"],
            "deny": ["203.0.113.128/25", "203.0.113.128/25"],
            "proxy-protocol": "v2",
        },
    )
    rule = AddressRule(
        allow=(net("203.0.113.0/24"), net("2001:db8::/32"), net("192.0.2.7/32")),
        deny=(net("203.0.113.128/25"),),
    )
    assert config.tunnels == (
        TunnelSpec(local_port=22, visitors=rule, proxy_protocol="v2"),
        TunnelSpec(local_port=80, remote_port=8080, visitors=rule, proxy_protocol="v2"),
    )


def test_plain_specs_have_no_options() -> None:
    (spec,) = build_client_config({}, {**BASE, "tunnel": ["22"]}).tunnels
    assert spec.visitors.empty
    assert spec.proxy_protocol is None


def test_toml_keys_per_tunnel(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text(
        'server = "relay.example"\ntoken = "t0ken"\n'
        "[[tunnel]]\nlocal_port = 5432\n"
        'allow = ["10.0.0.0/8", "2001:db8::/48"]\ndeny = "10.9.0.0/16"\nproxy_protocol = "v1"\n'
        '[[tunnel]]\nlocal_port = 22\nproxy-protocol = "V2"\n'
        "[[tunnel]]\nlocal_port = 80\n"
    )
    config = build_client_config(load_toml(path, "client"), {"state-dir": "/x"})
    first, second, third = config.tunnels
    assert first.visitors == AddressRule(
        allow=(net("10.0.0.0/8"), net("2001:db8::/48")), deny=(net("10.9.0.0/16"),)
    )
    assert first.proxy_protocol == "v1"
    assert second.visitors.empty
    assert second.proxy_protocol == "v2"
    assert third == TunnelSpec(local_port=80)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"allow": ["10.0.0.1/8"]},
            "option --allow '10.0.0.1/8': host bits set; did you mean 10.0.0.0/8?",
        ),
        (
            {"deny": ["2001:db8::1/32"]},
            "option --deny '2001:db8::1/32': host bits set; did you mean 2001:db8::/32?",
        ),
        ({"allow": ["10.0.0.0/33"]}, "option --allow '10.0.0.0/33': expected an IPv4 or IPv6"),
        ({"deny": ["example.com"]}, "option --deny 'example.com': expected an IPv4 or IPv6"),
        (
            {"proxy-protocol": "v3"},
            "option --proxy-protocol: unknown PROXY protocol version 'v3' "
            '(expected "v1" or "v2")',
        ),
        (
            {"allow": [f"10.0.{i}.0/24" for i in range(65)]},
            "option --allow: at most 64 entries, got 65",
        ),
    ],
)
def test_flag_errors(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_client_config({}, {**BASE, "tunnel": ["22"], **flags})
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("flag", ["allow", "deny", "proxy-protocol"])
def test_flags_need_specs_on_the_command_line(flag: str) -> None:
    value: object = "v1" if flag == "proxy-protocol" else ["10.0.0.0/8"]
    file_values = {"tunnel": [{"local_port": 22}]}
    with pytest.raises(ConfigError, match=f"--{flag} applies to the SPECs on the command line"):
        build_client_config(file_values, {**BASE, flag: value})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"allow": ["10.0.0.1/8"]},
            "config key 'tunnel'[0]: key 'allow' '10.0.0.1/8': host bits set; "
            "did you mean 10.0.0.0/8?",
        ),
        ({"deny": [7]}, "config key 'tunnel'[0]: key 'deny': expected an address or network"),
        ({"allow": 7}, "config key 'tunnel'[0]: key 'allow': expected a list"),
        (
            {"proxy_protocol": 2},
            "config key 'tunnel'[0]: key 'proxy_protocol': unknown PROXY protocol version 2",
        ),
        ({"allowed": []}, "config key 'tunnel'[0]: unknown key 'allowed' (known: allow, deny,"),
    ],
)
def test_toml_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_client_config({"tunnel": [{"local_port": 22, **table}]}, BASE)
    assert str(info.value).startswith(message)


def test_top_level_allow_in_the_file_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text('allow = ["10.0.0.0/8"]\n')
    with pytest.raises(ConfigError, match="unknown key 'allow'"):
        load_toml(path, "client")


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    """In-process CLI runs configure the root logger; undo that after the test."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield
    for handler in root.handlers[:]:
        if handler not in saved[1]:
            root.removeHandler(handler)
    root.setLevel(saved[0])


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--allow", "198.51.100.1/24"], "host bits set; did you mean 198.51.100.0/24?"),
        (["--proxy-protocol", "v9"], "unknown PROXY protocol version 'v9'"),
    ],
)
def test_cli_reports_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    code = cli.run(
        [
            "client",
            "--server",
            "127.0.0.1:9",
            "--token",
            "t0ken",
            "--state-dir",
            str(tmp_path / "state"),
            *args,
            "22",
        ]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.USAGE
    assert len(lines) == 1, lines
    assert lines[0].startswith("muxtunnel: error: option --")
    assert fragment in lines[0]


# --------------------------------------------------------------------------------------------
# Against a real relay


async def _visit_from(source: str, port: int, payload: bytes) -> bytes:
    """Connect from ``source`` to 127.0.0.1:port, send, half-close, read until EOF or reset."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    received = bytearray()
    try:
        await sock.connect(("127.0.0.1", port))
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(payload)
            await stream.send_eof()
            while chunk := await stream.receive_some(65536):
                received += chunk
    except (trio.BrokenResourceError, OSError):  # reset by the relay, at any step
        pass
    finally:
        sock.close()
    return bytes(received)


async def test_allow_list_reaches_the_relay(nursery: trio.Nursery, tmp_path: Path) -> None:
    served: list[str] = []

    async def record_and_echo(stream: trio.SocketStream) -> None:
        served.append("connection")
        while chunk := await stream.receive_some(65536):
            await stream.send_all(chunk)
        await stream.send_eof()

    port = await start_service(nursery, record_and_echo)
    relay = await start_relay(nursery, tmp_path)
    rule = AddressRule(allow=(net("127.0.0.2/32"),))
    client = await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=port, visitors=rule)]
    )
    public = client.port()
    assert client.lines == [
        f"forwarding tcp://127.0.0.1:{public} -> 127.0.0.1:{port} (allow 127.0.0.2/32)"
    ]
    with trio.fail_after(30):
        assert await _visit_from("127.0.0.2", public, b"allowed") == b"allowed"
        assert served == ["connection"]
        assert await _visit_from("127.0.0.3", public, b"refused") == b""
        # A later allowed visitor proves the refused one never reached the service.
        assert await _visit_from("127.0.0.2", public, b"again") == b"again"
    assert served == ["connection", "connection"]


async def test_deny_list_and_proxy_protocol_line(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay = await start_relay(nursery, tmp_path)
    rule = AddressRule(allow=(net("127.0.0.0/8"), net("::1/128")), deny=(net("127.0.0.3/32"),))
    spec = TunnelSpec(local_port=9, visitors=rule, proxy_protocol="v1")
    client = await start_client(nursery, tmp_path, relay, [spec])
    assert client.lines == [
        f"forwarding tcp://127.0.0.1:{client.port()} -> 127.0.0.1:9 "
        "(allow 127.0.0.0/8, ::1/128; deny 127.0.0.3/32; PROXY protocol v1)"
    ]


@pytest.fixture
def minor_zero_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ends of every session in this process speak protocol 1.0 (no BIND options)."""
    monkeypatch.setattr("muxtunnel.protocol.session.PROTOCOL_MINOR", 0)


@pytest.mark.usefixtures("minor_zero_relay")
async def test_rule_on_an_old_relay_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay = await start_relay(nursery, tmp_path)
    rule = AddressRule(deny=(net("10.0.0.0/8"),))
    with pytest.raises(TunnelError) as info:
        await start_client(
            nursery,
            tmp_path,
            relay,
            [TunnelSpec(local_port=9), TunnelSpec(local_port=10, visitors=rule)],
        )
    assert str(info.value) == (
        f"the relay at 127.0.0.1:{relay.info.port} does not support visitor allow/deny lists "
        "(protocol 1.0); upgrade it"
    )
    # Nothing was bound: no public port of the relay's range accepts connections.
    lo, hi = relay.config.port_range
    for port in range(lo, hi + 1):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, port


@pytest.mark.usefixtures("minor_zero_relay")
async def test_plain_tunnels_still_work_on_an_old_relay(
    nursery: trio.Nursery, tmp_path: Path, echo_port: int
) -> None:
    relay = await start_relay(nursery, tmp_path)
    spec = TunnelSpec(local_port=echo_port, proxy_protocol="v2")  # the header is client-side only
    client = await start_client(nursery, tmp_path, relay, [spec])
    with trio.fail_after(30):
        echoed = await echo_roundtrip(client.port(), b"ping")
    assert echoed.endswith(b"ping")
    assert echoed.startswith(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\x7f\x00\x00\x01")
