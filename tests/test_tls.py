"""TLS identity, fingerprints and relay verification, with real handshakes over loopback."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import stat
from typing import TYPE_CHECKING

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from muxtunnel.errors import ConfigError, ExitCode, HandshakeError, IdentityMismatchError
from muxtunnel.tls import (
    KnownHosts,
    ServerIdentity,
    client_ssl_context,
    fingerprint_of_der,
    fingerprint_of_file,
    generate_self_signed,
    identity_error_from_exception,
    load_or_create_identity,
    normalize_fingerprint,
    server_ssl_context,
    verify_server,
)

if TYPE_CHECKING:
    from pathlib import Path

# --------------------------------------------------------------------------------------------
# Helpers


async def connect(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1"
) -> tuple[trio.SSLStream[trio.SocketStream], int]:
    """Run one TLS handshake over a loopback TCP connection; return the client stream and port.

    The server side is accepted, handshaken and closed inside this call.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    client: trio.SSLStream[trio.SocketStream] | None = None
    failure: trio.BrokenResourceError | None = None

    async def serve_one() -> None:
        raw = await listener.accept()
        server = trio.SSLStream(raw, server_ctx, server_side=True)
        try:
            await server.do_handshake()
            await server.send_all(b"ok")
        except trio.BrokenResourceError:
            pass  # the client refused the handshake
        finally:
            await trio.aclose_forcefully(server)

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_one)
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                client = trio.SSLStream(tcp, client_ctx, server_hostname=server_hostname)
                try:
                    await client.do_handshake()
                    assert await client.receive_some(2) == b"ok"
                except trio.BrokenResourceError as exc:
                    await trio.aclose_forcefully(client)
                    failure = exc
    finally:
        await listener.aclose()
    if failure is not None:
        raise failure
    assert client is not None
    return client, port


def make_ca(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a leaf for localhost/127.0.0.1 signed by it: (ca, chain, leaf key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "muxtunnel test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain_path = tmp_path / "chain.pem"
    chain_path.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    key_path = tmp_path / "leaf.key"
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, chain_path, key_path


@pytest.fixture
def identity(tmp_path: Path) -> ServerIdentity:
    return load_or_create_identity(tmp_path / "relay-state")


# --------------------------------------------------------------------------------------------
# Identity files and fingerprints


def test_identity_is_created_once_and_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_identity(state)
    assert first.created
    assert first.cert_path == state / "cert.pem"
    assert first.key_path == state / "key.pem"
    assert stat.S_IMODE(first.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    again = load_or_create_identity(state)
    assert not again.created
    assert again.fingerprint == first.fingerprint

    cert = x509.load_pem_x509_certificate(first.cert_path.read_bytes())
    assert first.fingerprint == fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    hostname = socket.gethostname().lower()
    if hostname and hostname != "localhost":
        assert hostname in san.get_values_for_type(x509.DNSName)
    assert set(san.get_values_for_type(x509.IPAddress)) >= {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= lifetime <= datetime.timedelta(days=3652)


def test_identity_half_present_is_an_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    identity = load_or_create_identity(state)
    identity.key_path.unlink()
    with pytest.raises(ConfigError, match=r"cert\.pem exists but key\.pem is missing"):
        load_or_create_identity(state)
    with pytest.raises(ConfigError, match="--cert and --key"):
        load_or_create_identity(state, cert_file=identity.cert_path)


def test_identity_from_files(tmp_path: Path) -> None:
    cert_pem, key_pem = generate_self_signed("relay.example.com")
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    ident = load_or_create_identity(tmp_path / "unused", tmp_path / "c.pem", tmp_path / "k.pem")
    assert not ident.created
    assert ident.fingerprint == fingerprint_of_file(tmp_path / "c.pem")
    assert not (tmp_path / "unused").exists()
    other_cert, _ = generate_self_signed("other")
    (tmp_path / "other.pem").write_bytes(other_cert)
    with pytest.raises(ConfigError, match="cannot load"):
        load_or_create_identity(tmp_path, tmp_path / "other.pem", tmp_path / "k.pem")
    with pytest.raises(ConfigError, match="cannot read"):
        load_or_create_identity(tmp_path, tmp_path / "missing.pem", tmp_path / "k.pem")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        fingerprint_of_file(tmp_path / "k.pem")


def test_normalize_fingerprint() -> None:
    hex64 = "0123456789abcdef" * 4
    canonical = "sha256:" + hex64
    colons = ":".join(hex64[i : i + 2] for i in range(0, 64, 2)).upper()
    for text in (
        canonical,
        hex64,
        canonical.upper(),
        "SHA256:" + colons,
        colons,
        f"  {canonical}\n",
    ):
        assert normalize_fingerprint(text) == canonical
    for bad in (
        "",
        "sha256:",
        "sha1:" + hex64,
        "sha256:" + hex64[:-1],
        "sha256:" + hex64 + "00",
        "x" * 64,
    ):
        with pytest.raises(ConfigError, match="is not a fingerprint"):
            normalize_fingerprint(bad)


# --------------------------------------------------------------------------------------------
# Handshakes


async def test_pinned_fingerprint_ok(identity: ServerIdentity, tmp_path: Path) -> None:
    stream, port = await connect(server_ssl_context(identity), client_ssl_context())
    async with stream:
        assert stream.version() == "TLSv1.3"
        known = KnownHosts(tmp_path / "known_hosts")
        reports: list[str] = []
        fp = verify_server(
            stream, f"127.0.0.1:{port}", identity.fingerprint.upper(), None, known, reports.append
        )
        assert fp == identity.fingerprint
        assert reports == []
        assert not known.path.exists()  # pinning explicitly writes nothing


async def test_pinned_fingerprint_mismatch(identity: ServerIdentity, tmp_path: Path) -> None:
    wrong = "sha256:" + "0" * 64
    stream, port = await connect(server_ssl_context(identity), client_ssl_context())
    async with stream:
        with pytest.raises(IdentityMismatchError) as info:
            verify_server(stream, f"127.0.0.1:{port}", wrong, None, KnownHosts(tmp_path / "kh"))
    message = str(info.value)
    assert identity.fingerprint in message
    assert wrong in message
    assert info.value.exit_code == ExitCode.IDENTITY_MISMATCH


async def test_trust_on_first_use_then_refuse_changed_cert(
    identity: ServerIdentity, tmp_path: Path
) -> None:
    known = KnownHosts(tmp_path / "client-state" / "known_hosts")
    known.path.parent.mkdir()
    reports: list[str] = []
    stream, port = await connect(server_ssl_context(identity), client_ssl_context())
    key = f"127.0.0.1:{port}"
    async with stream:
        assert verify_server(stream, key, None, None, known, reports.append) == identity.fingerprint
    assert reports == [
        f"pinned relay {key} fingerprint {identity.fingerprint} (trust on first use; stored in {known.path})"
    ]
    assert stat.S_IMODE(known.path.stat().st_mode) == 0o600
    assert known.lookup(key) == (identity.fingerprint, 2)

    # same certificate again: accepted silently
    stream, _ = await connect(server_ssl_context(identity), client_ssl_context())
    async with stream:
        assert verify_server(stream, key, None, None, known, reports.append) == identity.fingerprint
    assert len(reports) == 1

    # the relay's certificate changed (new state dir): refused, with instructions
    changed = load_or_create_identity(tmp_path / "other-relay")
    stream, _ = await connect(server_ssl_context(changed), client_ssl_context())
    async with stream:
        with pytest.raises(IdentityMismatchError) as info:
            verify_server(stream, key, None, None, known, reports.append)
    message = str(info.value)
    assert changed.fingerprint in message
    assert identity.fingerprint in message
    assert f"{known.path} line 2" in message
    assert "delete line 2" in message
    assert known.get(key) == identity.fingerprint  # the pin was not replaced


async def test_ca_mode(tmp_path: Path) -> None:
    ca, chain, key = make_ca(tmp_path)
    ident = load_or_create_identity(tmp_path / "unused", chain, key)
    known = KnownHosts(tmp_path / "kh")
    for hostname in ("localhost", "127.0.0.1"):
        stream, port = await connect(server_ssl_context(ident), client_ssl_context(ca), hostname)
        async with stream:
            assert verify_server(stream, f"{hostname}:{port}", None, ca, known) == ident.fingerprint
    assert not known.path.exists()

    # a self-signed relay is not trusted by the CA
    self_signed = load_or_create_identity(tmp_path / "self")
    with pytest.raises(trio.BrokenResourceError) as info:
        await connect(server_ssl_context(self_signed), client_ssl_context(ca), "localhost")
    error = identity_error_from_exception(info.value, "localhost:1", ca)
    assert isinstance(error, IdentityMismatchError)
    assert f"--ca {ca}" in str(error)

    # right CA, wrong name
    with pytest.raises(trio.BrokenResourceError) as info:
        await connect(server_ssl_context(ident), client_ssl_context(ca), "relay.example.com")
    error = identity_error_from_exception(info.value, "relay.example.com:1", ca)
    assert error is not None
    assert "relay.example.com" in str(error)
    assert identity_error_from_exception(trio.BrokenResourceError("x"), "h:1", ca) is None


async def test_alpn_and_tls13_required(identity: ServerIdentity, tmp_path: Path) -> None:
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    plain.load_cert_chain(identity.cert_path, identity.key_path)
    stream, port = await connect(plain, client_ssl_context())
    async with stream:
        with pytest.raises(HandshakeError, match="did not negotiate ALPN 'muxtunnel/1'"):
            verify_server(
                stream, f"127.0.0.1:{port}", identity.fingerprint, None, KnownHosts(tmp_path / "kh")
            )

    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(trio.BrokenResourceError):
        await connect(server_ssl_context(identity), old)


def test_client_context_bad_ca(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="--ca"):
        client_ssl_context(tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="--ca"):
        client_ssl_context(tmp_path / "missing.pem")


def test_known_hosts_file_format(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    fp = "sha256:" + "1" * 64
    path.write_text(f"# comment\n\nRelay.Example.com:7835 {fp.upper()}\n[::1]:7835 {fp}\n")
    known = KnownHosts(path)
    assert known.lookup("relay.example.com:7835") == (fp, 3)
    assert known.get("[::1]:7835") == fp
    assert known.get("other:1") is None
    known.add("other:1", fp)
    assert known.lookup("other:1") == (fp, 5)
    path.write_text("broken line with spaces\n")
    with pytest.raises(ConfigError, match="line 1"):
        known.get("x:1")
    path.write_text("host:1 sha256:nothex\n")
    with pytest.raises(ConfigError, match="line 1"):
        known.get("x:1")
