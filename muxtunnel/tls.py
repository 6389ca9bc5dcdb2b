"""TLS for muxtunnel: the relay's identity, SSL contexts, and checking the relay's certificate.

The relay authenticates itself with a certificate. By default it is an ECDSA P-256 self-signed
certificate the relay generates in its state dir on first start; clients check it in one of
three ways:

* ``--fingerprint sha256:...``: the SHA-256 of the certificate (DER) must match (pinning);
* ``--ca FILE``: the usual chain and host-name verification against that CA;
* neither: trust on first use. The first fingerprint seen for ``host:port`` is stored in the
  client's ``known_hosts`` file and every later connection must present the same one.

Only TLS 1.3 is accepted, with ALPN ``muxtunnel/1`` (protocol-spec.md, transport).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from muxtunnel.errors import (
    ConfigError,
    HandshakeError,
    IdentityMismatchError,
    state_file_error,
)
from muxtunnel.protocol.constants import ALPN
from muxtunnel.tokens import check_private_file, ensure_private_dir, write_private_file

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

__all__ = [
    "CERT_FILE_NAME",
    "KEY_FILE_NAME",
    "KNOWN_HOSTS_FILE_NAME",
    "KnownHosts",
    "PeerCertSource",
    "ServerIdentity",
    "client_ssl_context",
    "fingerprint_of_der",
    "fingerprint_of_file",
    "fingerprint_of_pem",
    "generate_self_signed",
    "identity_error_from_exception",
    "load_or_create_identity",
    "normalize_fingerprint",
    "server_ssl_context",
    "verify_server",
]

logger = logging.getLogger(__name__)

#: File names inside the state dir.
CERT_FILE_NAME = "cert.pem"
KEY_FILE_NAME = "key.pem"
KNOWN_HOSTS_FILE_NAME = "known_hosts"

#: Validity of a generated certificate. Long on purpose: clients pin it, and rotating it
#: means every client must re-pin, so it should change only when the operator decides.
CERT_VALIDITY = datetime.timedelta(days=3650)

_FP_PREFIX = "sha256:"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------
# Fingerprints


def fingerprint_of_der(der: bytes) -> str:
    """Return ``"sha256:"`` + the 64 lowercase hex digits of SHA-256 over a DER certificate."""
    return _FP_PREFIX + hashlib.sha256(der).hexdigest()


def fingerprint_of_pem(pem: bytes) -> str:
    """Fingerprint of the first certificate in a PEM blob.

    Raises:
        ValueError: No parsable certificate in ``pem``.
    """
    cert = x509.load_pem_x509_certificate(pem)
    return fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))


def fingerprint_of_file(path: Path) -> str:
    """Fingerprint of the first certificate in a PEM file.

    Raises:
        ConfigError: The file is unreadable or holds no certificate.
    """
    try:
        return fingerprint_of_pem(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"certificate {path}: cannot read: {exc.strerror or exc}") from None
    except ValueError:
        raise ConfigError(f"certificate {path}: not a PEM certificate") from None


def normalize_fingerprint(text: str, *, what: str = "fingerprint") -> str:
    """Normalize a fingerprint to ``sha256:<64 lowercase hex>``.

    Accepts an optional ``sha256:`` prefix in any case, upper-case hex, and hex pairs
    separated by colons (``AB:CD:...``) or spaces, as other tools print them.

    Raises:
        ConfigError: ``text`` is not a SHA-256 fingerprint.
    """
    body = text.strip()
    if body.lower().startswith(_FP_PREFIX):
        body = body[len(_FP_PREFIX) :]
    body = re.sub(r"[\s:]", "", body).lower()
    if not _HEX64.match(body):
        raise ConfigError(
            f"{what}: {text!r} is not a fingerprint; expected sha256: followed by 64 hex digits"
        )
    return _FP_PREFIX + body


# --------------------------------------------------------------------------------------------
# The relay's identity


def _san_names(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in ["localhost", *hostnames]:
        key = name.lower().rstrip(".")
        if not key or key in seen:
            continue
        seen.add(key)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(key)))
        except ValueError:
            if re.match(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$", key):
                names.append(x509.DNSName(key))
    names.extend(
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1") if ip not in seen
    )
    return names


def generate_self_signed(common_name: str, *, hostnames: Iterable[str] = ()) -> tuple[bytes, bytes]:
    """Generate an ECDSA P-256 key and a self-signed server certificate for it.

    The certificate is valid for 10 years and names ``localhost``, ``common_name``, any
    ``hostnames``, 127.0.0.1 and ::1 as subject alternative names.

    Returns:
        ``(cert_pem, key_pem)``; the key is unencrypted PKCS#8.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "muxtunnel")])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(
            x509.SubjectAlternativeName(_san_names([common_name, *hostnames])), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert_pem, key_pem


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """The relay's certificate and key files, and the certificate's fingerprint."""

    cert_path: Path
    key_path: Path
    fingerprint: str
    #: True if this process generated the files just now.
    created: bool


def _check_pair(cert_path: Path, key_path: Path) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise ConfigError(
                f"certificate {cert_path} / key {key_path}: cannot load: {exc.reason or exc}"
            ) from None
        raise ConfigError(
            f"{exc.filename or cert_path}: cannot read: {exc.strerror or exc}"
        ) from None


def load_or_create_identity(
    state_dir: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ServerIdentity:
    """Return the relay's TLS identity, generating it in ``state_dir`` on first use.

    With ``cert_file`` and ``key_file`` those are used as given (the certificate file may hold
    a chain, leaf first). Otherwise ``state_dir/cert.pem`` and ``state_dir/key.pem`` (mode
    0600) are reused, or created when neither exists.

    Raises:
        ConfigError: Only one of the two files is given or present, or they do not load.
    """
    if (cert_file is None) != (key_file is None):
        raise ConfigError("--cert and --key must be given together")
    if cert_file is not None and key_file is not None:
        _check_pair(cert_file, key_file)
        check_private_file(key_file, "key file")
        return ServerIdentity(cert_file, key_file, fingerprint_of_file(cert_file), False)
    ensure_private_dir(state_dir)
    cert_path, key_path = state_dir / CERT_FILE_NAME, state_dir / KEY_FILE_NAME
    created = False
    if not cert_path.exists() and not key_path.exists():
        hostname = socket.gethostname()
        cert_pem, key_pem = generate_self_signed(hostname or "muxtunnel", hostnames=[hostname])
        # Key first: a cert without its key is an error on the next start, not silently replaced.
        if write_private_file(key_path, key_pem):
            write_private_file(cert_path, cert_pem)
            created = True
            logger.info("generated a self-signed certificate in %s", state_dir)
    for path, other in ((cert_path, key_path), (key_path, cert_path)):
        if not path.exists():
            raise ConfigError(
                f"state dir {state_dir}: {other.name} exists but {path.name} is missing; "
                f"restore it, or delete {other} to generate a new identity (clients must then re-pin)"
            )
    for path in (cert_path, key_path):
        try:
            path.open("rb").close()
        except OSError as exc:
            raise state_file_error("read", path, exc) from None
    check_private_file(key_path, "key file")
    _check_pair(cert_path, key_path)
    return ServerIdentity(cert_path, key_path, fingerprint_of_file(cert_path), created)


# --------------------------------------------------------------------------------------------
# Contexts


def server_ssl_context(identity: ServerIdentity) -> ssl.SSLContext:
    """SSL context for the relay's control listener: TLS 1.3 only, ALPN ``muxtunnel/1``.

    Raises:
        ConfigError: The certificate or key does not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    # Clients never resume sessions; tickets would only cost bytes after every handshake.
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    except OSError as exc:
        raise ConfigError(f"certificate {identity.cert_path}: cannot load: {exc}") from None
    return ctx


def client_ssl_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """SSL context for the client: TLS 1.3 only, ALPN ``muxtunnel/1``.

    With ``ca_file`` the chain and host name are verified during the handshake (pass the
    relay's host as ``server_hostname``). Without it the handshake accepts any certificate
    and :func:`verify_server` must be called afterwards to pin it.

    Raises:
        ConfigError: ``ca_file`` cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    if ca_file is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--ca {ca_file}: cannot load CA certificates: {exc}") from None
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# --------------------------------------------------------------------------------------------
# Checking the relay


class KnownHosts:
    """The client's trust-on-first-use store: lines of ``HOST:PORT sha256:<hex>``.

    Blank lines and ``#`` comments are ignored; the first line for a key wins.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _entries(self) -> list[tuple[int, str, str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise state_file_error("read", self.path, exc) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"known hosts file {self.path}: cannot read: {exc}") from None
        entries = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ConfigError(
                    f"known hosts file {self.path} line {number}: expected 'HOST:PORT sha256:...'"
                )
            fp = normalize_fingerprint(parts[1], what=f"known hosts file {self.path} line {number}")
            entries.append((number, parts[0].lower(), fp))
        return entries

    def lookup(self, server_key: str) -> tuple[str, int] | None:
        """Return ``(fingerprint, line_number)`` pinned for ``server_key``, or None.

        Raises:
            ConfigError: The file is unreadable or malformed.
        """
        key = server_key.lower()
        for number, host, fp in self._entries():
            if host == key:
                return fp, number
        return None

    def get(self, server_key: str) -> str | None:
        """Return the fingerprint pinned for ``server_key``, or None."""
        found = self.lookup(server_key)
        return None if found is None else found[0]

    def add(self, server_key: str, fingerprint: str) -> None:
        """Pin ``fingerprint`` for ``server_key`` (creates the file with mode 0600).

        Raises:
            ConfigError: The file cannot be written.
        """
        line = f"{server_key.lower()} {normalize_fingerprint(fingerprint)}\n"
        ensure_private_dir(self.path.parent)
        header = "# muxtunnel relays pinned on first use: HOST:PORT sha256:FINGERPRINT\n"
        write_private_file(self.path, header.encode())
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:
            raise state_file_error("write", self.path, exc) from None


class PeerCertSource(Protocol):
    """What :func:`verify_server` needs: an ``ssl.SSLObject`` or a handshaken ``trio.SSLStream``."""

    def getpeercert(self, binary_form: bool = ...) -> Any:
        """The peer's certificate (DER bytes with ``binary_form=True``)."""

    def selected_alpn_protocol(self) -> str | None:
        """The ALPN protocol the server selected."""


def verify_server(
    ssl_object: PeerCertSource,
    server_key: str,
    fingerprint: str | None,
    ca_file: Path | None,
    known_hosts: KnownHosts,
    report: Callable[[str], None] = print,
) -> str:
    """Check the relay's certificate after the TLS handshake; return its fingerprint.

    Args:
        ssl_object: The handshaken connection (``trio.SSLStream`` or ``ssl.SSLObject``).
        server_key: ``HOST:PORT`` of the relay as the user named it (IPv6 in brackets).
        fingerprint: The ``--fingerprint`` pin, or None.
        ca_file: The ``--ca`` file, or None. The chain was verified by the handshake.
        known_hosts: Trust-on-first-use store, used when neither pin nor CA is given.
        report: Receives one line when a relay is pinned on first use.

    Raises:
        HandshakeError: The relay did not negotiate ALPN ``muxtunnel/1``.
        IdentityMismatchError: The certificate is missing or does not match the pin.
    """
    alpn = ssl_object.selected_alpn_protocol()
    if alpn != ALPN:
        raise HandshakeError(
            f"relay {server_key} did not negotiate ALPN {ALPN!r} (got {alpn!r}); is it a muxtunnel relay?"
        )
    der = ssl_object.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        raise IdentityMismatchError(f"relay {server_key} presented no certificate")
    actual = fingerprint_of_der(der)
    if fingerprint is not None:
        expected = normalize_fingerprint(fingerprint)
        if not hmac.compare_digest(expected, actual):
            raise IdentityMismatchError(
                f"relay {server_key} presented certificate {actual}, but --fingerprint is {expected}; "
                "refusing to connect (check the relay's fingerprint with `muxtunnel fingerprint` on the relay)"
            )
        return actual
    if ca_file is not None:
        return actual
    found = known_hosts.lookup(server_key)
    if found is None:
        known_hosts.add(server_key, actual)
        report(
            f"pinned relay {server_key} fingerprint {actual} (trust on first use; stored in {known_hosts.path})"
        )
        return actual
    pinned, line = found
    if not hmac.compare_digest(pinned, actual):
        raise IdentityMismatchError(
            f"relay {server_key} presented certificate {actual}, but {pinned} is pinned for it "
            f"(trust on first use, {known_hosts.path} line {line}); refusing to connect. "
            "Someone may be intercepting the connection. If the relay's certificate was changed on "
            f"purpose, check its new fingerprint on the relay (`muxtunnel fingerprint`) and delete line {line} "
            f"of {known_hosts.path}, or pass --fingerprint"
        )
    return actual


def identity_error_from_exception(
    exc: BaseException, server_key: str, ca_file: Path | None
) -> IdentityMismatchError | None:
    """Turn a failed handshake caused by certificate verification into an IdentityMismatchError.

    ``trio.SSLStream`` raises ``trio.BrokenResourceError`` from the ``ssl`` error; this walks
    the ``__cause__``/``__context__`` chain looking for ``ssl.SSLCertVerificationError``.

    Returns:
        The error to raise, or None when the failure is not a verification failure.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            detail = current.verify_message or current.reason or str(current)
            against = f"the CA in --ca {ca_file}" if ca_file is not None else "the trusted CAs"
            return IdentityMismatchError(
                f"relay {server_key}: certificate verification against {against} failed: {detail}"
            )
        current = current.__cause__ or current.__context__
    return None
