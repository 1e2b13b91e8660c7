"""The certificate store: client certificates for the SMGW link.

Layout under ``smgw.cert_store`` (default ``state_dir/certs``)::

    <name>/cert.pem     the certificate, followed by its chain (if imported with one)
    <name>/key.pem      the private key, never logged or printed
    <name>/request.csr  the CSR of ``cert request`` until the signed certificate is imported
    selected            the name chosen by ``cert select``

The store and each ``<name>`` folder are 0700, every file in it 0600, whatever the umask.

The configuration's ``smgw.certificate`` takes precedence over ``selected``.

A certificate outside its validity period (the certificate or a certificate of its chain expired, or not
valid yet) is neither imported nor selected unless forced (``--force``; the admin API's ``force``): the
gateway would refuse the handshake with it, and the link would keep retrying.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from chargegate.config import Config
from chargegate.files import private_dir, write_private
from smgw_link.pki import key_pem, new_key
from smgw_link.tlsconf import fingerprint, format_fingerprint

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
# names the store keeps files of its own under (a certificate of that name would collide with them)
RESERVED_NAMES = frozenset({"selected"})
WARN_DAYS = 30
REQUEST_CURVES = ("brainpoolP256r1", "P-256")


class CertStoreError(ValueError):
    pass


class CertNameError(CertStoreError):
    """A name that cannot be used for a certificate (invalid, or reserved by the store)."""


class CertExistsError(CertStoreError):
    """A certificate or key of that name exists and ``replace`` was not given."""


class CertValidityError(CertStoreError):
    """The certificate (or one of its chain) is expired or not valid yet; ``force`` overrides it."""

    def __init__(self, name: str, problems: list[str], doing: str) -> None:
        self.name = name
        self.problems = problems
        super().__init__(f"{name} not {doing}: " + "; ".join(problems))


def validity_problems(certs: list[x509.Certificate], now: dt.datetime | None = None) -> list[str]:
    """Why ``certs`` (a certificate and its chain) cannot be used at ``now``: one sentence per certificate
    outside its validity period, with the date it names (notBefore / notAfter)."""
    now = now or dt.datetime.now(dt.UTC)
    out = []
    for i, c in enumerate(certs):
        what = "the certificate" if i == 0 else f"chain certificate {i} ({c.subject.rfc4514_string()})"
        if now < c.not_valid_before_utc:
            out.append(f"{what} is not valid yet: notBefore {c.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC "
                       f"(now {now:%Y-%m-%d %H:%M:%S} UTC)")
        elif now >= c.not_valid_after_utc:
            out.append(f"{what} has expired: notAfter {c.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC "
                       f"(now {now:%Y-%m-%d %H:%M:%S} UTC)")
    return out


@dataclass
class CertInfo:
    name: str
    subject: str
    issuer: str
    key_type: str
    curve: str | None
    not_before: dt.datetime
    not_after: dt.datetime
    sha256: str
    has_key: bool
    chain_len: int
    selected: bool = False

    def days_left(self, now: dt.datetime | None = None) -> float:
        return (self.not_after - (now or dt.datetime.now(dt.UTC))).total_seconds() / 86400

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.days_left(now) < 0


def key_description(pub: object) -> tuple[str, str | None]:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return "EC", _curve_name(pub.curve)
    if isinstance(pub, rsa.RSAPublicKey):
        return f"RSA-{pub.key_size}", None
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "Ed25519", None
    if isinstance(pub, ed448.Ed448PublicKey):
        return "Ed448", None
    return type(pub).__name__, None


def _curve_name(curve: ec.EllipticCurve) -> str:
    return {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(curve.name, curve.name)


def cert_info(name: str, certs: list[x509.Certificate], has_key: bool, selected: bool = False) -> CertInfo:
    leaf = certs[0]
    kt, curve = key_description(leaf.public_key())
    return CertInfo(name=name, subject=leaf.subject.rfc4514_string(), issuer=leaf.issuer.rfc4514_string(),
                    key_type=kt, curve=curve, not_before=leaf.not_valid_before_utc,
                    not_after=leaf.not_valid_after_utc,
                    sha256=fingerprint(leaf.public_bytes(serialization.Encoding.DER)), has_key=has_key,
                    chain_len=len(certs) - 1, selected=selected)


def _same_key(cert: x509.Certificate, key: object) -> bool:
    pub = key.public_key()  # type: ignore[attr-defined]
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(cert.public_key().public_bytes(*fmt) == pub.public_bytes(*fmt))


def _load_key(data: bytes, password: bytes | None) -> object:
    try:
        return serialization.load_pem_private_key(data, password)
    except (ValueError, TypeError) as e:
        raise CertStoreError(f"the private key cannot be read: {e}") from None


class CertStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_config(cls, config: Config) -> CertStore:
        return cls(config.smgw.cert_store or (config.state_dir / "certs"))

    # -- paths -----------------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        if not NAME_RE.match(name):
            raise CertNameError(f"invalid certificate name {name!r} (letters, digits, . _ -)")
        if name.lower() in RESERVED_NAMES:
            raise CertNameError(f"the name {name!r} is reserved: the certificate store keeps its own "
                                f"{', '.join(sorted(RESERVED_NAMES))} file under it; choose another name")
        d = self.root / name
        if d.exists() and not d.is_dir():
            raise CertNameError(f"the name {name!r} is taken by a file in {self.root} that is not a certificate; "
                                f"choose another name")
        return d

    def cert_path(self, name: str) -> Path:
        return self._dir(name) / "cert.pem"

    def key_path(self, name: str) -> Path:
        return self._dir(name) / "key.pem"

    def _prepare(self, name: str | None = None) -> Path:
        private_dir(self.root)
        return private_dir(self._dir(name)) if name is not None else self.root

    # -- import ----------------------------------------------------------------------------------
    def import_pem(self, name: str, cert_file: Path, key_file: Path | None = None,
                   password: str | None = None, replace: bool = False, force: bool = False) -> CertInfo:
        """Import a PEM certificate (with optional chain). The key comes from ``key_file``, from
        the same PEM file, or from an earlier ``cert request`` under the same name. One outside its
        validity period only with ``force``."""
        return self.import_pem_bytes(name, _read(cert_file), _read(key_file) if key_file is not None else None,
                                     password, replace, source=str(cert_file), force=force)

    def import_pem_bytes(self, name: str, data: bytes, key_data: bytes | None = None, password: str | None = None,
                         replace: bool = False, source: str = "the upload", force: bool = False) -> CertInfo:
        """:meth:`import_pem` from memory (the admin API's upload)."""
        self._dir(name)  # a name that cannot be used is the first thing to say
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise CertStoreError(f"{source} holds no PEM certificate") from None
        pw = password.encode() if password else None
        if key_data is not None:
            key = _load_key(key_data, pw)
        elif b"PRIVATE KEY" in data:
            key = _load_key(data, pw)
        elif self.key_path(name).exists():
            key = _load_key(self.key_path(name).read_bytes(), None)
        else:
            raise CertStoreError(f"no private key for {name}: give --key, or import the certificate "
                                 f"under the name used with `cert request`")
        return self._store(name, certs, key, replace, force)

    def import_pkcs12(self, name: str, p12_file: Path, password: str | None, replace: bool = False,
                      force: bool = False) -> CertInfo:
        return self.import_pkcs12_bytes(name, _read(p12_file), password, replace, source=str(p12_file), force=force)

    def import_pkcs12_bytes(self, name: str, data: bytes, password: str | None, replace: bool = False,
                            source: str = "the upload", force: bool = False) -> CertInfo:
        self._dir(name)
        try:
            key, cert, extra = pkcs12.load_key_and_certificates(data, password.encode() if password else None)
        except (ValueError, TypeError) as e:
            raise CertStoreError(f"{source} cannot be opened (wrong password or not PKCS#12): {e}") from None
        if key is None or cert is None:
            raise CertStoreError(f"{source} does not hold a certificate with its private key")
        return self._store(name, [cert, *(extra or [])], key, replace, force)

    def import_file(self, name: str, path: Path, key_file: Path | None = None, password: str | None = None,
                    replace: bool = False, force: bool = False) -> CertInfo:
        data = _read(path)
        if b"-----BEGIN" in data:
            return self.import_pem(name, path, key_file, password, replace, force)
        return self.import_pkcs12(name, path, password, replace, force)

    def _store(self, name: str, certs: list[x509.Certificate], key: object, replace: bool,
               force: bool = False) -> CertInfo:
        d = self._dir(name)
        if not _same_key(certs[0], key):
            raise CertStoreError("the private key does not belong to the certificate")
        if (d / "cert.pem").exists() and not replace:
            raise CertExistsError(f"certificate {name} exists; use --replace to overwrite it")
        problems = validity_problems(certs)
        if problems and not force:
            raise CertValidityError(name, problems, "imported")
        self._prepare(name)
        write_private(d / "key.pem", key_pem(key))  # type: ignore[arg-type]
        write_private(d / "cert.pem", b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
        (d / "request.csr").unlink(missing_ok=True)
        return cert_info(name, certs, True, self.selected() == name)

    # -- request ---------------------------------------------------------------------------------
    def request(self, name: str, common_name: str, curve: str = "brainpoolP256r1", organization: str | None = None,
                country: str | None = None, dns: tuple[str, ...] = (), replace: bool = False) -> bytes:
        """Generate a key (kept in the store) and return a CSR (PEM) for the gateway admin's PKI."""
        if curve not in REQUEST_CURVES:
            raise CertStoreError(f"curve must be one of {', '.join(REQUEST_CURVES)}")
        d = self._dir(name)
        if (d / "key.pem").exists() and not replace:
            raise CertExistsError(f"{name} already has a key; use --replace to make a new one")
        key = new_key(curve)
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:
            attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        if country:
            attrs.insert(0, x509.NameAttribute(NameOID.COUNTRY_NAME, country))
        b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
        if dns:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]), critical=False)
        csr = b.sign(key, hashes.SHA256())
        self._prepare(name)
        write_private(d / "key.pem", key_pem(key))
        (d / "cert.pem").unlink(missing_ok=True)
        pem = csr.public_bytes(serialization.Encoding.PEM)
        write_private(d / "request.csr", pem)
        return pem

    # -- listing and selection -------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def certificates(self, name: str) -> list[x509.Certificate]:
        """The certificate ``name`` followed by its chain."""
        path = self.cert_path(name)
        if not path.exists():
            if (self._dir(name) / "request.csr").exists():
                raise CertStoreError(f"{name} is a pending request: import the signed certificate first")
            raise CertStoreError(f"no certificate {name} in {self.root}")
        try:
            return x509.load_pem_x509_certificates(path.read_bytes())
        except ValueError:
            raise CertStoreError(f"{path} is damaged") from None

    def info(self, name: str) -> CertInfo:
        return cert_info(name, self.certificates(name), self.key_path(name).exists(), self.selected() == name)

    def list(self) -> list[CertInfo | str]:
        """Infos of all certificates; pending requests appear as their name."""
        out: list[CertInfo | str] = []
        for n in self.names():
            try:
                out.append(self.info(n))
            except CertStoreError:
                out.append(n)
        return out

    def selected(self) -> str | None:
        f = self.root / "selected"
        if not f.exists():
            return None
        name = f.read_text().strip()
        return name or None

    def select(self, name: str, force: bool = False) -> CertInfo:
        """Make ``name`` the certificate of the link; one outside its validity period only with ``force``."""
        certs = self.certificates(name)
        info = cert_info(name, certs, self.key_path(name).exists(), self.selected() == name)
        if not info.has_key:
            raise CertStoreError(f"{name} has no private key")
        problems = validity_problems(certs)
        if problems and not force:
            raise CertValidityError(name, problems, "selected")
        self._prepare()
        write_private(self.root / "selected", name + "\n")
        info.selected = True
        return info

    def active(self, configured: str | None) -> CertInfo:
        """The certificate the link uses: the configured name, else the selected one."""
        name = configured or self.selected()
        if name is None:
            raise CertStoreError(f"no certificate selected in {self.root}: run `chargegate cert import` "
                                 f"and `chargegate cert select`, or set smgw.certificate")
        info = self.info(name)
        if not info.has_key:
            raise CertStoreError(f"certificate {name} has no private key")
        return info


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CertStoreError(f"cannot read {path}: {e.strerror}") from None


def describe(info: CertInfo, now: dt.datetime | None = None) -> str:
    days = info.days_left(now)
    state = "EXPIRED" if days < 0 else (f"expires in {days:.0f} days" if days < WARN_DAYS else "valid")
    if (now or dt.datetime.now(dt.UTC)) < info.not_before:
        state = "NOT VALID YET"
    key = info.key_type + (f" {info.curve}" if info.curve else "")
    return (f"{'*' if info.selected else ' '} {info.name}\n"
            f"    subject   {info.subject}\n    issuer    {info.issuer}\n    key       {key}"
            f"{'' if info.has_key else ' (no private key!)'}\n"
            f"    valid     {info.not_before:%Y-%m-%d %H:%M} .. {info.not_after:%Y-%m-%d %H:%M} UTC ({state})\n"
            f"    sha256    {format_fingerprint(info.sha256)}\n    chain     {info.chain_len} more certificate(s)")
