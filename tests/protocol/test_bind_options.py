"""BIND options (protocol-spec.md §6.12, minor version 1): codec, validation and session plumbing.

Frames are fed as bytes, as a peer would send them; malformed options are a connection error
PROTOCOL_ERROR (§4.5 step 5), invalid options given to the encoder a ValueError.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from muxtunnel.errors import ErrorCode, ProtocolError
from muxtunnel.protocol.constants import (
    BIND_FLAG_OPTIONS,
    BIND_NAME_MAX,
    BIND_OPTION_LIST_MAX,
    MAGIC,
    PROTOCOL_MINOR,
    AuthMethod,
    BindOptionKind,
    FrameType,
    ResultStatus,
    Role,
)
from muxtunnel.protocol.events import (
    AuthRequested,
    BindRequested,
    ChallengeReceived,
    ResultReceived,
)
from muxtunnel.protocol.frames import (
    HEADER,
    Address,
    AuthFrame,
    BindFrame,
    BindOptions,
    ChallengeFrame,
    IPNetwork,
    OpenFrame,
    decode_payload,
    encode_frame,
    is_tunnel_name,
)
from muxtunnel.protocol.requests import PIPELINE_BUDGET
from muxtunnel.protocol.session import Session

from .helpers import (
    SERVER_NONCE,
    SessionPair,
    expect_close,
    hello_bytes,
    make_credential,
    parse_frames,
)

NONE = Address(None, 0)
NET4 = ipaddress.IPv4Network("198.51.100.0/24")
NET6 = ipaddress.IPv6Network("2001:db8::/32")
CHALLENGE = encode_frame(ChallengeFrame(nonce=SERVER_NONCE))

# ---------------------------------------------------------------------------------------
# Raw builders: a BIND payload with hand-made option entries


def entry(kind: int, value: bytes) -> bytes:
    """One option entry: kind u8, len u8, value."""
    return bytes((kind, len(value))) + value


def net_value(prefix: int, address: str) -> bytes:
    return bytes((prefix,)) + ipaddress.ip_address(address).packed


def bind_payload(
    entries: bytes, *, bind: bytes = b"\x00", flags: int = BIND_FLAG_OPTIONS, trailer: bytes = b""
) -> bytes:
    """BIND(req 2, tunnel 1, TCP, flags, bind, options = BYTES16(entries)) + trailer."""
    fixed = struct.pack("!IIBB", 2, 1, 1, flags)
    return fixed + bind + struct.pack("!H", len(entries)) + entries + trailer


def decode_bind(payload: bytes) -> BindFrame:
    frame = decode_payload(FrameType.BIND, 0, 0, payload)
    assert isinstance(frame, BindFrame)
    return frame


def bind_wire(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), FrameType.BIND, 0, 0, 0) + payload


# ---------------------------------------------------------------------------------------
# Encoding: exact layout


def test_allow_and_deny_encode_as_prefix_then_address() -> None:
    frame = BindFrame(
        req_id=2, tunnel_id=1, proto=1, bind=NONE, options=BindOptions(allow=(NET4,), deny=(NET6,))
    )
    wire = encode_frame(frame)
    expected = bind_payload(
        entry(1, bytes((24, 198, 51, 100, 0)))
        + entry(2, bytes((32,)) + bytes.fromhex("20010db8") + bytes(12))
    )
    assert wire == bind_wire(expected)
    assert wire[16 + 9] == BIND_FLAG_OPTIONS  # the flags byte of the payload


def test_name_visit_and_unknown_encode_in_a_fixed_order() -> None:
    named = BindFrame(req_id=2, tunnel_id=1, proto=1, bind=NONE, options=BindOptions(name="web"))
    assert encode_frame(named) == bind_wire(bind_payload(entry(3, b"web")))
    visit = BindFrame(
        req_id=2, tunnel_id=1, proto=1, bind=NONE, options=BindOptions(visit="db", unknown=(9, 0))
    )
    assert encode_frame(visit) == bind_wire(bind_payload(entry(4, b"db") + b"\x09\x00\x00\x00"))


def test_no_options_means_no_flag_and_no_field() -> None:
    frame = BindFrame(req_id=2, tunnel_id=1, proto=1, bind=NONE)
    assert encode_frame(frame) == bind_wire(bind_payload(b"", flags=0)[:-2])
    empty = BindFrame(req_id=2, tunnel_id=1, proto=1, bind=NONE, options=BindOptions())
    assert encode_frame(empty) == bind_wire(bind_payload(b""))
    assert decode_bind(bind_payload(b"")).options == BindOptions()
    assert BindOptions().empty
    assert not BindOptions().private


def test_other_flag_bits_survive_beside_options() -> None:
    payload = bind_payload(entry(3, b"web"), flags=0x83)
    frame = decode_bind(payload)
    assert frame.flags == 0x82
    assert frame.options == BindOptions(name="web")
    assert encode_frame(frame) == bind_wire(payload)


# ---------------------------------------------------------------------------------------
# Decoding: valid inputs


def test_unknown_kinds_are_kept_and_their_values_skipped() -> None:
    payload = bind_payload(
        entry(0x7F, b"whatever")
        + entry(1, net_value(8, "10.0.0.0"))
        + entry(0, b"")
        + entry(5, b"x")
    )
    options = decode_bind(payload).options
    assert options == BindOptions(
        allow=(ipaddress.IPv4Network("10.0.0.0/8"),), unknown=(0x7F, 0, 5)
    )
    assert not options.empty


@pytest.mark.parametrize(
    ("value", "network"),
    [
        (net_value(0, "0.0.0.0"), "0.0.0.0/0"),
        (net_value(32, "192.0.2.1"), "192.0.2.1/32"),
        (net_value(0, "::"), "::/0"),
        (net_value(128, "2001:db8::1"), "2001:db8::1/128"),
        (net_value(64, "2001:db8:0:1::"), "2001:db8:0:1::/64"),
    ],
)
def test_prefix_extremes_decode(value: bytes, network: str) -> None:
    options = decode_bind(bind_payload(entry(2, value))).options
    assert options == BindOptions(deny=(ipaddress.ip_network(network),))


def test_64_entries_of_each_list_are_accepted() -> None:
    nets4 = [net_value(32, f"10.0.0.{i}") for i in range(BIND_OPTION_LIST_MAX)]
    nets6 = [net_value(128, f"2001:db8::{i:x}") for i in range(BIND_OPTION_LIST_MAX)]
    entries = b"".join(entry(1, v) for v in nets4) + b"".join(entry(2, v) for v in nets6)
    options = decode_bind(bind_payload(entries)).options
    assert options is not None
    assert len(options.allow) == len(options.deny) == BIND_OPTION_LIST_MAX


def test_allow_and_deny_may_go_with_a_public_address_and_with_name() -> None:
    port = b"\x01\x00\x00\x00\x00\x4e\x36"  # 0.0.0.0:20022
    frame = decode_bind(bind_payload(entry(1, net_value(8, "10.0.0.0")), bind=port))
    assert frame.bind == Address("0.0.0.0", 20022)
    named = decode_bind(bind_payload(entry(3, b"ssh.home") + entry(2, net_value(16, "10.1.0.0"))))
    assert named.options == BindOptions(
        deny=(ipaddress.ip_network("10.1.0.0/16"),), name="ssh.home"
    )
    assert named.options.private


# ---------------------------------------------------------------------------------------
# Decoding: every violation is PROTOCOL_ERROR

MALFORMED = {
    "ipv4-prefix-33": entry(1, net_value(33, "10.0.0.0")),
    "ipv6-prefix-129": entry(2, net_value(129, "2001:db8::")),
    "ipv4-host-bits": entry(1, net_value(24, "10.0.0.1")),
    "ipv6-host-bits": entry(2, net_value(32, "2001:db8::1")),
    "length-0": entry(1, b""),
    "length-4": entry(1, bytes(4)),
    "length-6": entry(2, bytes(6)),
    "length-16": entry(1, bytes(16)),
    "length-18": entry(2, bytes(18)),
    "65-allow": entry(1, net_value(0, "0.0.0.0")) * 65,
    "65-deny": entry(2, net_value(0, "::")) * 65,
    "name-empty": entry(3, b""),
    "name-64-bytes": entry(3, b"a" * 64),
    "name-upper-case": entry(3, b"Web"),
    "name-leading-dash": entry(3, b"-web"),
    "name-leading-dot": entry(4, b".web"),
    "name-slash": entry(3, b"a/b"),
    "name-space": entry(4, b"a b"),
    "name-newline": entry(3, b"web\n"),
    "name-not-ascii": entry(3, "caf\u00e9".encode()),
    "name-latin-1": entry(4, b"caf\xe9"),
    "name-ipv4-literal": entry(3, b"10.0.0.1"),
    "name-digit-groups": entry(4, b"1.2.3.04"),
    "two-names": entry(3, b"a") + entry(3, b"b"),
    "two-visits": entry(4, b"a") + entry(4, b"a"),
    "name-and-visit": entry(3, b"a") + entry(4, b"b"),
    "entry-head-cut": entry(1, net_value(8, "10.0.0.0")) + b"\x01",
    "entry-value-overrun": b"\x03\x05ab",
}


@pytest.mark.parametrize("entries", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_options_are_protocol_errors(entries: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_bind(bind_payload(entries))
    assert info.value.error_code == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "bind",
    [b"\x01\x00\x00\x00\x00\x00\x00", b"\x04" + bytes(18), b"\x03\x04host\x00\x00"],
    ids=["ipv4", "ipv6", "domain"],
)
@pytest.mark.parametrize("kind", [3, 4], ids=["name", "visit"])
def test_name_and_visit_need_bind_atyp_0(bind: bytes, kind: int) -> None:
    with pytest.raises(ProtocolError, match="atyp 0"):
        decode_bind(bind_payload(entry(kind, b"web"), bind=bind))


@pytest.mark.parametrize(
    "payload",
    [
        bind_payload(b"", trailer=b"\x00"),  # a byte after the options field
        bind_payload(entry(3, b"web"))[:-1],  # the options field runs past the payload
        bind_payload(b"")[:-1],  # the BYTES16 length itself is cut
        bind_payload(entry(3, b"web"), flags=0),  # no OPTIONS flag: the field is trailing garbage
    ],
    ids=["trailing", "overrun", "length-cut", "flag-clear"],
)
def test_options_field_framing(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_bind(payload)


def test_option_kind_registry() -> None:
    assert {k.name: int(k) for k in BindOptionKind} == {
        "ALLOW": 1,
        "DENY": 2,
        "NAME": 3,
        "VISIT": 4,
    }


def test_tunnel_name_syntax() -> None:
    assert is_tunnel_name("a")
    assert is_tunnel_name("0")
    assert is_tunnel_name("ssh-01.home_lab")
    assert is_tunnel_name("a" * BIND_NAME_MAX)
    assert is_tunnel_name("10.0.0")  # not an IPv4 literal
    assert is_tunnel_name("1.2.3.4.5")
    assert is_tunnel_name("1.2.3.x")
    bad_names = ("", "a" * (BIND_NAME_MAX + 1), "_a", "A", "a:b", "é", "a\n", "a b")
    for bad in (*bad_names, "10.0.0.1", "1.2.3.04", "999.0.0.0"):
        assert not is_tunnel_name(bad), bad


# ---------------------------------------------------------------------------------------
# Encoding validates like the decoder


@pytest.mark.parametrize(
    ("options", "bind"),
    [
        (BindOptions(allow=(NET4,) * 65), NONE),
        (BindOptions(deny=(NET6,) * 65), NONE),
        (BindOptions(allow=("10.0.0.0/8",)), NONE),  # type: ignore[arg-type]
        (BindOptions(name=""), NONE),
        (BindOptions(name="Web"), NONE),
        (BindOptions(visit="a" * 64), NONE),
        (BindOptions(name="a", visit="b"), NONE),
        (BindOptions(name="a"), Address("0.0.0.0", 0)),
        (BindOptions(visit="a"), Address("db.example", 5432)),
        (BindOptions(unknown=(1,)), NONE),
        (BindOptions(unknown=(4,)), NONE),
        (BindOptions(unknown=(256,)), NONE),
        (BindOptions(unknown=(-1,)), NONE),
    ],
)
def test_encoder_rejects_what_a_decoder_would(options: BindOptions, bind: Address) -> None:
    with pytest.raises(ValueError):
        encode_frame(BindFrame(req_id=2, tunnel_id=1, proto=1, bind=bind, options=options))


def test_options_flag_bit_is_not_set_by_hand() -> None:
    with pytest.raises(ValueError, match="OPTIONS"):
        encode_frame(BindFrame(req_id=2, tunnel_id=1, proto=1, bind=NONE, flags=BIND_FLAG_OPTIONS))


# ---------------------------------------------------------------------------------------
# Round trip (Hypothesis)


def _networks(version: Literal[4, 6]) -> st.SearchStrategy[IPNetwork]:
    bits = 32 if version == 4 else 128
    return st.tuples(st.ip_addresses(v=version), st.integers(0, bits)).map(
        lambda t: ipaddress.ip_network((t[0], t[1]), strict=False)
    )


NETWORKS = st.one_of(_networks(4), _networks(6))
NAMES = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,62}", fullmatch=True).filter(is_tunnel_name)
UNKNOWN_KINDS = st.integers(0, 255).filter(lambda k: k not in {1, 2, 3, 4})


@st.composite
def bind_frames(draw: st.DrawFn) -> BindFrame:
    allow = tuple(draw(st.lists(NETWORKS, max_size=BIND_OPTION_LIST_MAX)))
    deny = tuple(draw(st.lists(NETWORKS, max_size=5)))
    which = draw(st.sampled_from(["public", "name", "visit"]))
    name = draw(NAMES) if which == "name" else None
    visit = draw(NAMES) if which == "visit" else None
    bind = NONE if which != "public" else draw(st.sampled_from([NONE, Address("0.0.0.0", 2222)]))
    options = BindOptions(
        allow=allow,
        deny=deny,
        name=name,
        visit=visit,
        unknown=tuple(draw(st.lists(UNKNOWN_KINDS, max_size=4))),
    )
    return BindFrame(
        req_id=draw(st.integers(1, 2**32 - 1)),
        tunnel_id=draw(st.integers(1, 2**32 - 1)),
        proto=1,
        bind=bind,
        flags=draw(st.integers(0, 255)) & ~BIND_FLAG_OPTIONS,
        options=options,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bind_frames())
def test_options_round_trip(frame: BindFrame) -> None:
    wire = encode_frame(frame)
    assert decode_bind(wire[16:]) == frame
    assert len(wire) - 16 == HEADER.unpack_from(wire)[0]


# ---------------------------------------------------------------------------------------
# Session plumbing


def test_bind_requested_carries_the_options() -> None:
    pair = SessionPair(tunnels=())
    assert pair.client.minor == pair.server.minor == PROTOCOL_MINOR == 2
    options = BindOptions(allow=(NET4,), deny=(NET6,))
    pair.client.send_bind(5, 3, Address("0.0.0.0", 2222), options=options)
    pair.client.send_bind(6, 4, NONE, options=BindOptions(visit="db"))
    pair.client.send_bind(7, 5, NONE)
    events = pair.server.receive_data(pair.client.data_to_send(), 0.0)
    assert events == [
        BindRequested(
            req_id=5, tunnel_id=3, proto=1, bind=Address("0.0.0.0", 2222), options=options
        ),
        BindRequested(req_id=6, tunnel_id=4, proto=1, bind=NONE, options=BindOptions(visit="db")),
        BindRequested(req_id=7, tunnel_id=5, proto=1, bind=NONE, options=BindOptions()),
    ]
    pair.server.send_result(6, ResultStatus.OK, bound=Address("db", 0))
    events = pair.client.receive_data(pair.server.data_to_send(), 0.0)
    assert events == [
        ResultReceived(req_id=6, status=ResultStatus.OK, message="", bound=Address("db", 0))
    ]


def test_invalid_options_queue_nothing() -> None:
    pair = SessionPair(tunnels=())
    with pytest.raises(ValueError):
        pair.client.send_bind(5, 3, Address("0.0.0.0", 2222), options=BindOptions(name="web"))
    assert not pair.client.wants_write()
    pair.client.send_bind(5, 3, NONE, options=BindOptions(name="web"))  # req_id 5 is still free
    assert pair.client.wants_write()


def test_send_bind_with_options_needs_the_peer_hello() -> None:
    client = Session(Role.CLIENT)
    with pytest.raises(ValueError, match="minor version 1"):
        client.send_bind(2, 1, NONE, options=BindOptions(name="web"))
    client.send_bind(2, 1, NONE)  # without options: fine, as before


def test_send_bind_with_options_to_a_minor_0_relay_is_refused_locally() -> None:
    client = Session(Role.CLIENT)
    client.receive_data(MAGIC + hello_bytes(Role.SERVER, minor=0), 0.0)
    assert client.minor == 0
    with pytest.raises(ValueError, match="minor version 1"):
        client.send_bind(2, 1, NONE, options=BindOptions(allow=(NET4,)))
    client.receive_data(CHALLENGE, 0.0)
    client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
    client.send_bind(2, 1, NONE)


def _authenticated_server(client_minor: int) -> Session:
    """A relay session whose client announced ``client_minor`` and authenticated."""
    server = Session(Role.SERVER)
    server.send_challenge(SERVER_NONCE)
    auth = AuthFrame(req_id=1, method=AuthMethod.HMAC_SHA256, credential=make_credential())
    events = server.receive_data(
        MAGIC + hello_bytes(Role.CLIENT, minor=client_minor) + encode_frame(auth), 0.0
    )
    assert server.minor == min(client_minor, PROTOCOL_MINOR)
    assert isinstance(events[-1], AuthRequested)
    server.send_result(1, ResultStatus.OK)
    server.data_to_send()
    return server


def test_relay_refuses_options_from_a_minor_0_client() -> None:
    server = _authenticated_server(0)
    wire = bind_wire(bind_payload(entry(3, b"web")))
    expect_close(server, wire, ErrorCode.PROTOCOL_ERROR)


def test_relay_closes_on_malformed_options() -> None:
    server = _authenticated_server(1)
    ok = server.receive_data(bind_wire(bind_payload(entry(3, b"web"))), 0.0)
    assert ok == [
        BindRequested(req_id=2, tunnel_id=1, proto=1, bind=NONE, options=BindOptions(name="web"))
    ]
    bad = bind_payload(entry(1, net_value(24, "10.0.0.1")))
    bad = struct.pack("!I", 3) + bad[4:]  # a fresh request id
    expect_close(server, bind_wire(bad), ErrorCode.PROTOCOL_ERROR)


def test_relay_reports_unknown_kinds_for_the_application_to_refuse() -> None:
    server = _authenticated_server(1)
    events = server.receive_data(bind_wire(bind_payload(entry(0x42, b"future"))), 0.0)
    assert events == [
        BindRequested(
            req_id=2, tunnel_id=1, proto=1, bind=NONE, options=BindOptions(unknown=(0x42,))
        )
    ]
    server.send_result(2, ResultStatus.MALFORMED, "unsupported BIND option 0x42")
    assert not server.closed


# ---------------------------------------------------------------------------------------
# Pipelining behind AUTH stays within the relay's pre-authentication limit (§7.6)


def _largest_options(i: int) -> BindOptions:
    allow = tuple(ipaddress.IPv6Network(f"2001:db8:{i:x}:{j:x}::/64") for j in range(64))
    deny = tuple(ipaddress.IPv6Network(f"2001:db8:ffff:{j:x}::/64") for j in range(64))
    return BindOptions(allow=allow, deny=deny)


def test_large_binds_wait_for_the_auth_result_and_the_relay_takes_them_all() -> None:
    client = Session(Role.CLIENT)
    server = Session(Role.SERVER)  # default pre-authentication limit: 16 KiB
    server.send_challenge(SERVER_NONCE)
    events = client.receive_data(server.data_to_send(), 0.0)
    assert isinstance(events[-1], ChallengeReceived)
    client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
    for i in range(12):  # 12 BINDs of about 2.5 KB each: 30 KB in all
        client.send_bind(2 + i, 1 + i, NONE, options=_largest_options(i))
    first = client.data_to_send()
    bind_bytes = sum(16 + len(p) for t, _, _, p in parse_frames(first) if t == FrameType.BIND)
    assert 0 < bind_bytes <= PIPELINE_BUDGET
    assert len(first) < server.config.preauth_limit
    events = server.receive_data(first, 0.0)
    server.send_result(1, ResultStatus.OK)
    events += server.receive_data(b"", 0.0)
    binds = [e for e in events if isinstance(e, BindRequested)]
    assert 0 < len(binds) < 12
    for event in binds:
        server.send_result(
            event.req_id, ResultStatus.OK, bound=Address("0.0.0.0", 20000 + event.tunnel_id)
        )
    client.receive_data(server.data_to_send(), 0.0)
    assert client.authenticated
    rest = server.receive_data(client.data_to_send(), 0.0)  # the held-back BINDs, now all at once
    binds += [e for e in rest if isinstance(e, BindRequested)]
    assert [e.tunnel_id for e in binds] == list(range(1, 13))
    assert all(e.options == _largest_options(e.tunnel_id - 1) for e in binds)
    assert not server.closed


def test_small_binds_are_all_pipelined_as_before() -> None:
    client = Session(Role.CLIENT)
    client.receive_data(MAGIC + hello_bytes(Role.SERVER, minor=1) + CHALLENGE, 0.0)
    client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
    for i in range(15):
        client.send_bind(2 + i, 1 + i, NONE, options=BindOptions(allow=(NET4,)))
    kinds = [t for t, _, _, _ in parse_frames(client.data_to_send())]
    assert kinds.count(FrameType.BIND) == 15


@settings(max_examples=200, deadline=None)
@given(NAMES)
def test_a_valid_name_always_travels_as_a_domain(name: str) -> None:
    """ADDR(NAME, 0) in RESULT.bound and in a visit OPEN's target is atyp 3 (§5.1, §7.2)."""
    wire = encode_frame(OpenFrame(stream_id=1, tunnel_id=1, origin=NONE, target=Address(name, 0)))
    assert wire[16 + 4 + 1] == 0x03  # after tunnel_id and the 1-byte none origin
    assert wire[16 + 4 + 2] == len(name)
