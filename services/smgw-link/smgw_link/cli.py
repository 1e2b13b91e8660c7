"""``chargegate cert ...``: the certificate store of the SMGW link.

    chargegate cert import NAME FILE [--key KEY] [--password-env VAR | --password-file F] [--replace] [--force]
    chargegate cert list
    chargegate cert select NAME [--force]

A certificate that has expired or is not valid yet (it or its chain) is refused by import and select
(exit 1, naming notAfter / notBefore) unless ``--force``.
    chargegate cert request NAME --cn CN [--curve brainpoolP256r1|P-256] [--out FILE]
    chargegate cert test-pki DIR [--curve C]      (a complete test PKI for the demo and tests)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chargegate import config as cfgmod
from chargegate.cli import config_argument
from smgw_link.certstore import (
    REQUEST_CURVES,
    CertInfo,
    CertStore,
    CertStoreError,
    CertValidityError,
    describe,
    validity_problems,
)

DEFAULT_CONFIG = os.environ.get("CHARGEGATE_CONFIG", "chargegate.yaml")


def _store(args: argparse.Namespace) -> CertStore:
    if getattr(args, "store", None):
        return CertStore(Path(args.store))
    cfg = cfgmod.load(args.config)
    return CertStore.for_config(cfg)


def _password(args: argparse.Namespace) -> str | None:
    if args.password_env:
        try:
            return os.environ[args.password_env]
        except KeyError:
            raise CertStoreError(f"environment variable {args.password_env} is not set") from None
    if args.password_file:
        return Path(args.password_file).read_text().strip()
    return None


def _cmd_import(args: argparse.Namespace) -> int:
    store = _store(args)
    info = store.import_file(args.name, Path(args.file), Path(args.key) if args.key else None, _password(args),
                             replace=args.replace, force=args.force)
    print(f"imported into {store.root}:\n{describe(info)}")
    _warn_dates(store, info.name)
    if store.selected() is None:
        store.select(info.name, force=args.force)
        print(f"selected {info.name} for the SMGW link (it is the only one)")
    return 0


def _warn_dates(store: CertStore, name: str) -> None:
    for problem in validity_problems(store.certificates(name)):  # only after --force
        print(f"warning: {name}: {problem} (forced)", file=sys.stderr)


def _cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    items = store.list()
    if not items:
        print(f"no certificates in {store.root}")
        return 0
    for item in items:
        if isinstance(item, CertInfo):
            print(describe(item))
        else:
            print(f"  {item}\n    pending request: import the signed certificate with `cert import {item} FILE`")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    store = _store(args)
    info = store.select(args.name, force=args.force)
    print(f"selected for the SMGW link:\n{describe(info)}")
    _warn_dates(store, info.name)
    return 0


def _cmd_request(args: argparse.Namespace) -> int:
    store = _store(args)
    pem = store.request(args.name, args.cn, args.curve, args.org, args.country, tuple(args.dns or ()),
                        replace=args.replace)
    if args.out:
        Path(args.out).write_bytes(pem)
        print(f"key kept in {store.root / args.name} (mode 0600); CSR written to {args.out}")
    else:
        sys.stdout.write(pem.decode())
        print(f"# key kept in {store.root / args.name} (mode 0600)", file=sys.stderr)
    return 0


def _cmd_test_pki(args: argparse.Namespace) -> int:
    from smgw_link.pki import make_pki

    pki = make_pki(Path(args.dir), args.curve)
    print(f"test PKI ({args.curve}) in {pki.dir}\n  gateway certificate sha256 {pki.gateway_fingerprint()}\n"
          f"  chargegate client certificate: {pki.client_cert} (key {pki.client_key})")
    return 0


def _cmd_openapi(args: argparse.Namespace) -> int:
    from smgw_link.admin.openapi import render

    text = render()
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _wrap(fn):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except CertValidityError as e:
            print(f"chargegate cert: {e}; use --force to accept it anyway", file=sys.stderr)
            return 1
        except (CertStoreError, cfgmod.ConfigError, OSError) as e:
            print(f"chargegate cert: {e}", file=sys.stderr)
            return 1
    return run


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = subparsers.add_parser("cert", help="client certificates for the SMGW link")
    sub = c.add_subparsers(dest="cert_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        config_argument(p)
        p.add_argument("--store", default=None, help="certificate store directory (default: from the config)")

    i = sub.add_parser("import", help="import a PEM (certificate [+chain] [+key]) or PKCS#12 file")
    common(i)
    i.add_argument("name")
    i.add_argument("file")
    i.add_argument("--key", default=None, help="PEM private key (if not in FILE or from `cert request`)")
    i.add_argument("--password-env", default=None, help="environment variable holding the password")
    i.add_argument("--password-file", default=None, help="file holding the password")
    i.add_argument("--replace", action="store_true")
    i.add_argument("--force", action="store_true", help="import it even when it has expired or is not valid yet")
    i.set_defaults(func=_wrap(_cmd_import))

    li = sub.add_parser("list", help="subject, issuer, key type and curve, validity, fingerprint")
    common(li)
    li.set_defaults(func=_wrap(_cmd_list))

    s = sub.add_parser("select", help="the certificate the SMGW link uses")
    common(s)
    s.add_argument("name")
    s.add_argument("--force", action="store_true", help="select it even when it has expired or is not valid yet")
    s.set_defaults(func=_wrap(_cmd_select))

    r = sub.add_parser("request", help="a new key (kept in the store) and a CSR for the gateway admin's PKI")
    common(r)
    r.add_argument("name")
    r.add_argument("--cn", required=True, help="common name")
    r.add_argument("--curve", choices=REQUEST_CURVES, default="brainpoolP256r1")
    r.add_argument("--org", default=None)
    r.add_argument("--country", default=None)
    r.add_argument("--dns", action="append", help="subject alternative name (repeatable)")
    r.add_argument("--out", default=None, help="write the CSR here (default: stdout)")
    r.add_argument("--replace", action="store_true")
    r.set_defaults(func=_wrap(_cmd_request))

    a = subparsers.add_parser("admin", help="the admin API (served by smgw-link)")
    asub = a.add_subparsers(dest="admin_command", required=True)
    o = asub.add_parser("openapi", help="print or write the admin API's OpenAPI document")
    o.add_argument("--out", default=None, help="write it here (default: stdout)")
    o.set_defaults(func=_wrap(_cmd_openapi))

    t = sub.add_parser("test-pki", help="write a complete TEST PKI (gateway, device, operator; not for production)")
    t.add_argument("dir")
    t.add_argument("--curve", default="brainpoolP256r1")
    t.set_defaults(func=_wrap(_cmd_test_pki))
