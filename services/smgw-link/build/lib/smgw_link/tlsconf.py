"""TLS for the SMGW's HAN interface (BSI TR-03109-1, crypto per TR-03116-3).

* TLS 1.2 with the ECDHE-ECDSA suites AES-128-GCM-SHA256, AES-256-GCM-SHA384, AES-128-CBC-SHA256;
  TLS 1.3 (AES-GCM/CCM suites) when the peer offers it.
* Groups secp256r1, secp384r1 and brainpoolP256r1/384r1/512r1.

Python's ``ssl`` on OpenSSL 3.0 has no API for a list of groups (``set_ecdh_curve`` keeps
exactly one, which breaks P-256 gateways and TLS 1.3). We set the list on the context's
``SSL_CTX`` with ``SSL_CTX_set1_groups_list`` through ctypes, resolving the symbol in the very
libssl that ``_ssl`` is linked to. The pointer is located by the CPython layout of
``PySSLContext`` (``PyObject_HEAD`` followed by ``SSL_CTX *``) and checked before use: the
options read through it must equal ``ctx.options``. If anything does not fit, the fallback is
``set_ecdh_curve(<one group>)`` with TLS 1.2 as the maximum, loudly logged. OpenSSL 3.0 offers the
brainpool groups in TLS 1.2 only (RFC 8734 TLS 1.3 groups came with 3.2): with the list set, a
brainpool-only gateway negotiates TLS 1.2, a P-256 gateway TLS 1.3.

Gateway certificates are verified by OpenSSL's chain verification against the trust anchor
(``cryptography``'s x509 verifier refuses brainpool keys) and/or by a pinned SHA-256
fingerprint of the leaf, checked right after the handshake.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import socket
import ssl
from pathlib import Path

import structlog

log = structlog.get_logger("smgw_link.tls")

TLS12_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-SHA256"
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_CCM_SHA256"
HAN_GROUPS = ("P-256", "P-384", "brainpoolP256r1", "brainpoolP384r1", "brainpoolP512r1")

_SSL_CTRL_SET_GROUPS_LIST = 92


class TlsSetupError(RuntimeError):
    """The TLS context cannot be built (missing file, bad key, unsupported option)."""


# -- raw OpenSSL access ------------------------------------------------------------------------
class _OpenSSL:
    def __init__(self) -> None:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)  # dlsym on _ssl's handle also searches its libssl
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.restype = ctypes.c_long
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.restype = ctypes.c_uint64
        self.get_options.argtypes = [ctypes.c_void_p]
        self.set_ciphersuites = lib.SSL_CTX_set_ciphersuites
        self.set_ciphersuites.restype = ctypes.c_int
        self.set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

    def ssl_ctx(self, ctx: ssl.SSLContext) -> int:
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ptr or int(self.get_options(ptr)) != int(ctx.options):
            raise TlsSetupError("cannot locate SSL_CTX of the Python SSLContext")
        return int(ptr)


_openssl: _OpenSSL | None = None


def _lib() -> _OpenSSL:
    global _openssl
    if _openssl is None:
        try:
            _openssl = _OpenSSL()
        except (OSError, AttributeError, ImportError) as e:
            raise TlsSetupError(f"OpenSSL functions not reachable: {e}") from None
    return _openssl


def set_groups(ctx: ssl.SSLContext, groups: tuple[str, ...] | list[str] = HAN_GROUPS) -> str:
    """Enable exactly ``groups`` for key exchange (and, in TLS 1.2, certificate curves).

    Returns ``"groups"`` when the list was set, ``"single-curve"`` when only the fallback
    (one group, TLS 1.2 maximum) was possible.
    """
    try:
        lib = _lib()
        ptr = lib.ssl_ctx(ctx)
        if lib.ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(":".join(groups).encode())) != 1:
            raise TlsSetupError(f"OpenSSL refused the group list {':'.join(groups)}")
        return "groups"
    except TlsSetupError as e:
        fallback = next((g for g in groups if g.startswith("brainpool")), groups[0])
        log.warning("TLS group list unavailable, using one group and TLS 1.2", error=str(e), group=fallback)
        ctx.set_ecdh_curve({"P-256": "prime256v1", "P-384": "secp384r1"}.get(fallback, fallback))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return "single-curve"


def set_tls13_suites(ctx: ssl.SSLContext, suites: str = TLS13_SUITES) -> bool:
    try:
        lib = _lib()
        return lib.set_ciphersuites(lib.ssl_ctx(ctx), suites.encode()) == 1
    except TlsSetupError as e:
        log.warning("TLS 1.3 suites not restricted", error=str(e))
        return False


def _versions(ctx: ssl.SSLContext, tls_version: str) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls_version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif tls_version == "1.3":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    else:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as e:
        raise TlsSetupError(f"certificate or key file missing: {e.filename}") from None
    except ssl.SSLError as e:
        raise TlsSetupError(f"certificate {cert} and its key cannot be loaded: {e.reason or e}") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except FileNotFoundError:
        raise TlsSetupError(f"trust anchor {ca} not found") from None
    except ssl.SSLError as e:
        raise TlsSetupError(f"trust anchor {ca} cannot be loaded: {e.reason or e}") from None


def han_client_context(*, cert: Path, key: Path, trust_anchor: Path | None, check_name: bool,
                       tls_version: str = "auto", groups: tuple[str, ...] = HAN_GROUPS) -> ssl.SSLContext:
    """Client context for the HAN link: our certificate, the gateway's trust anchor (if any)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _versions(ctx, tls_version)
    ctx.set_ciphers(TLS12_CIPHERS)
    set_tls13_suites(ctx)
    set_groups(ctx, groups)
    _load_chain(ctx, cert, key)
    if trust_anchor is not None:
        _load_ca(ctx, trust_anchor)
        ctx.check_hostname = check_name
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:  # pinned fingerprint only: checked after the handshake
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def han_server_context(*, cert: Path, key: Path, client_ca: Path | None, tls_version: str = "auto",
                       groups: tuple[str, ...] = HAN_GROUPS, require_client_cert: bool = True) -> ssl.SSLContext:
    """Server context on the HAN side (inbound channel, and the SMGW simulator)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _versions(ctx, tls_version)
    ctx.set_ciphers(TLS12_CIPHERS)
    set_tls13_suites(ctx)
    set_groups(ctx, groups)
    _load_chain(ctx, cert, key)
    if client_ca is not None:
        _load_ca(ctx, client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise TlsSetupError("a server that requires client certificates needs a client CA")
    return ctx


# -- peer checks ---------------------------------------------------------------------------------
def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def format_fingerprint(fp: str) -> str:
    return ":".join(fp[i:i + 2] for i in range(0, len(fp), 2)).upper()


class CertificateMismatch(Exception):
    """The peer's certificate is not the one expected (pin or name)."""


def peer_der(obj: ssl.SSLObject | ssl.SSLSocket | None) -> bytes | None:
    if obj is None:
        return None
    try:
        return obj.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):
        return None


def check_peer(der: bytes | None, *, pins: list[str] | tuple[str, ...] = (), name: str | None = None) -> str:
    """Check a peer certificate against fingerprints and/or a name in its SAN; returns its fingerprint."""
    if der is None:
        raise CertificateMismatch("the peer presented no certificate")
    fp = fingerprint(der)
    if pins and fp not in pins:
        raise CertificateMismatch(f"certificate fingerprint {format_fingerprint(fp)} is not the pinned one")
    if name is not None and not name_matches(der, name):
        raise CertificateMismatch(f"certificate is not issued to {name}")
    return fp


def name_matches(der: bytes, name: str) -> bool:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if san is not None:
        if ip is not None:
            return ip in san.get_values_for_type(x509.IPAddress)
        return any(_dns_match(d, name) for d in san.get_values_for_type(x509.DNSName))
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return any(isinstance(cn, str) and _dns_match(cn, name) for cn in cns)


def _dns_match(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


# -- errors ----------------------------------------------------------------------------------------
class LinkError(Exception):
    """A failure on the way to an endpoint, with a kind a program can act on and a clear message.

    ``kind``: dns, tcp, timeout, tls, certificate, socks, closed, setup; ``code``: the SOCKS reply.
    """

    def __init__(self, kind: str, message: str, code: int | None = None) -> None:
        super().__init__(kind, message, code)
        self.kind = kind
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


_ALERT_HINTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the gateway does not know the CA of our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the gateway says a certificate has expired (ours, most likely)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the gateway rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the gateway rejected our certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the gateway requires a client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no common cipher suite, group or signature algorithm",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no common TLS version",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": "the peer wants stronger parameters",
    "TLSV1_ALERT_ACCESS_DENIED": "the gateway denied access to our certificate",
    "NO_SUITABLE_GROUPS": "no common key exchange group",
}


def classify(exc: BaseException, where: str) -> LinkError:
    """Turn a connection exception into a :class:`LinkError` naming ``where`` (host:port)."""
    if isinstance(exc, LinkError):
        return exc
    if isinstance(exc, CertificateMismatch):
        return LinkError("certificate", f"{where}: {exc}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = exc.verify_message or exc.reason or str(exc)
        return LinkError("certificate", f"{where}: gateway certificate rejected: {msg}")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if "ALERT" in reason:
            alert = reason.split("ALERT_", 1)[-1].lower().replace("_", " ")
            hint = _ALERT_HINTS.get(reason, "")
            return LinkError("tls", f"{where}: TLS alert {alert!r} ({reason})" + (f": {hint}" if hint else ""))
        hint = _ALERT_HINTS.get(reason, "")
        return LinkError("tls", f"{where}: TLS error {reason or exc}" + (f": {hint}" if hint else ""))
    if isinstance(exc, ConnectionRefusedError):
        return LinkError("tcp", f"{where}: TCP connection refused")
    if isinstance(exc, socket.gaierror):
        return LinkError("dns", f"{where}: host name not resolved ({exc.strerror})")
    if isinstance(exc, TimeoutError):
        return LinkError("timeout", f"{where}: no answer in time")
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return LinkError("closed", f"{where}: connection reset by the peer (a TLS rejection often looks like this)")
    if isinstance(exc, EOFError | ConnectionError):
        return LinkError("closed", f"{where}: connection closed by the peer ({exc or type(exc).__name__})")
    if isinstance(exc, OSError):
        return LinkError("tcp", f"{where}: {exc.strerror or exc}")
    return LinkError("error", f"{where}: {type(exc).__name__}: {exc}")


def set_keepalive(sock: socket.socket | None, idle_s: float) -> None:
    """TCP keepalive so that a silently dead HAN link is noticed on idle channels."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle_s)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(idle_s / 3)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:
        pass
