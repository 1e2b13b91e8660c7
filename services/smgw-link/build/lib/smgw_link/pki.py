"""A complete test PKI for the SMGW link (tests, the demo and the simulators).

``make_pki(dir, curve)`` writes:

* ``gateway-ca.pem`` - the SMGW PKI's CA; ``gateway.pem``/``gateway.key`` - the gateway's HAN
  certificate (server and client use; SAN ``smgw.local`` and 127.0.0.1)
* ``device-ca.pem`` - the CA that issues CLS device certificates; ``chargegate.pem``/``.key``
* ``operator-ca.pem`` - the market participant's CA; ``operator.pem``/``.key`` (SAN
  ``mqtt.operator.test``, ``ocpp.operator.test``, ``localhost``, 127.0.0.1)
* ``rogue-ca.pem`` + ``rogue.pem``/``.key`` - a client certificate from an unknown CA
* ``expired.pem``/``.key`` - a device certificate from the right CA that has expired
* ``gateway-other.pem``/``.key`` - a second gateway certificate of the same CA (wrong gateway)

Curves: brainpoolP256r1 (default), brainpoolP384r1, brainpoolP512r1, P-256, P-384.
Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chargegate import files

CURVES: dict[str, type[ec.EllipticCurve]] = {
    "brainpoolP256r1": ec.BrainpoolP256R1,
    "brainpoolP384r1": ec.BrainpoolP384R1,
    "brainpoolP512r1": ec.BrainpoolP512R1,
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
}
_HASH = {256: hashes.SHA256, 384: hashes.SHA384, 512: hashes.SHA512}


def new_key(curve: str) -> ec.EllipticCurvePrivateKey:
    try:
        return ec.generate_private_key(CURVES[curve]())
    except KeyError:
        raise ValueError(f"unknown curve {curve!r}; choose one of {', '.join(CURVES)}") from None


def _hash_for(key: ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    return _HASH.get(key.curve.key_size, hashes.SHA256)()


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def issue(cn: str, key: ec.EllipticCurvePrivateKey, issuer: Issued | None = None, *, ca: bool = False,
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), server: bool = False, client: bool = False,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
          org: str = "chargegate test") -> Issued:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer = issuer.key if issuer else key
    b = (x509.CertificateBuilder()
         .subject_name(name)
         .issuer_name(issuer.cert.subject if issuer else name)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before or now - dt.timedelta(minutes=10))
         .not_valid_after(not_after or now + dt.timedelta(days=365))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=True,
                                          encipher_only=False, decipher_only=False), critical=True)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        if usages:
            b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if issuer:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                            critical=False)
    return Issued(b.sign(signer, _hash_for(signer)), key)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only (0600) from the first byte on, whatever the umask."""
    files.write_private(path, data)


@dataclass
class Pki:
    dir: Path
    curve: str
    gateway_ca: Path
    gateway_cert: Path
    gateway_key: Path
    gateway_other_cert: Path
    gateway_other_key: Path
    device_ca: Path
    client_cert: Path
    client_key: Path
    operator_ca: Path
    operator_cert: Path
    operator_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path
    expired_cert: Path
    expired_key: Path

    def gateway_fingerprint(self) -> str:
        from smgw_link.tlsconf import fingerprint

        der = x509.load_pem_x509_certificate(self.gateway_cert.read_bytes()).public_bytes(
            serialization.Encoding.DER)
        return fingerprint(der)


GATEWAY_NAME = "smgw.local"
OPERATOR_NAMES = ("mqtt.operator.test", "ocpp.operator.test", "localhost")


def make_pki(out: Path, curve: str = "brainpoolP256r1", *, gateway_name: str = GATEWAY_NAME,
             client_cn: str = "chargegate-cls", operator_curve: str | None = None) -> Pki:
    """Generate the whole test PKI into ``out`` (see the module doc)."""
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def save(name: str, item: Issued, with_key: bool = True) -> tuple[Path, Path]:
        c, k = out / f"{name}.pem", out / f"{name}.key"
        c.write_bytes(cert_pem(item.cert))
        if with_key:
            write_private(k, key_pem(item.key))
        return c, k

    gw_ca = issue("SMGW test CA", new_key(curve), ca=True, org="SMGW PKI")
    gw = issue(gateway_name, new_key(curve), gw_ca, dns=(gateway_name, "localhost"), ips=("127.0.0.1",),
               server=True, client=True, org="SMGW PKI")
    gw_other = issue("smgw-other.local", new_key(curve), gw_ca, dns=("smgw-other.local", "localhost"),
                     ips=("127.0.0.1",), server=True, client=True, org="SMGW PKI")
    dev_ca = issue("CLS device test CA", new_key(curve), ca=True, org="Installer PKI")
    client = issue(client_cn, new_key(curve), dev_ca, dns=(client_cn, "localhost"), ips=("127.0.0.1",),
                   server=True, client=True)
    expired = issue(client_cn, new_key(curve), dev_ca, client=True,
                    not_before=now - dt.timedelta(days=400), not_after=now - dt.timedelta(days=1))
    op_curve = operator_curve or "P-256"
    op_ca = issue("Operator test CA", new_key(op_curve), ca=True, org="Operator")
    op = issue(OPERATOR_NAMES[0], new_key(op_curve), op_ca, dns=OPERATOR_NAMES, ips=("127.0.0.1",), server=True)
    rogue_ca = issue("Rogue CA", new_key(curve), ca=True, org="Rogue")
    rogue = issue(client_cn, new_key(curve), rogue_ca, client=True)

    paths: dict[str, Path] = {}
    for name, item in (("gateway-ca", gw_ca), ("device-ca", dev_ca), ("operator-ca", op_ca),
                       ("rogue-ca", rogue_ca)):
        paths[name], _ = save(name, item, with_key=False)
    gc, gk = save("gateway", gw)
    goc, gok = save("gateway-other", gw_other)
    cc, ck = save("chargegate", client)
    ec_, ek = save("expired", expired)
    oc, ok = save("operator", op)
    rc, rk = save("rogue", rogue)
    return Pki(out, curve, paths["gateway-ca"], gc, gk, goc, gok, paths["device-ca"], cc, ck,
               paths["operator-ca"], oc, ok, paths["rogue-ca"], rc, rk, ec_, ek)
