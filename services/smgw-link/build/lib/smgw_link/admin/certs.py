"""The SMGW client certificate: check, and switch over with automatic fall-back.

:func:`check` reads a certificate of the store: does the private key belong to it, is it valid
now, is each certificate of the chain signed by the next one (OpenSSL-compatible signature
checks; ``cryptography``'s policy verifier refuses brainpool keys), and does the chain end in a
trust anchor we know (the gateway's CA; informational: the SMGW's own trust store decides).

:class:`Switcher` selects a new certificate, has the link rebuild its TLS context and probe the
gateway with it, and waits for a successful probe made with it. If there is none within
``admin.switch_timeout_s``, the previous certificate is selected again and the link rebuilt
with it ("switch back by itself").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from chargegate.files import write_private
from smgw_link.certstore import (
    CertInfo,
    CertStore,
    CertStoreError,
    CertValidityError,
    key_description,
    validity_problems,
)

log = structlog.get_logger("smgw_link.admin.certs")


@dataclass
class CheckResult:
    name: str
    info: CertInfo | None
    key_matches: bool = False
    valid_now: bool = False
    chain_ok: bool = False
    anchored: str | None = None  # the trust anchor file that verified the top of the chain
    problems: list[str] = field(default_factory=list)  # each one makes the certificate unusable
    validity: list[str] = field(default_factory=list)  # those of ``problems`` about the validity period
    warnings: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


def _load_anchors(paths: list[Path]) -> list[tuple[Path, x509.Certificate]]:
    out = []
    for path in paths:
        try:
            for c in x509.load_pem_x509_certificates(path.read_bytes()):
                out.append((path, c))
        except (OSError, ValueError):
            continue
    return out


def check(store: CertStore, name: str, anchors: list[Path], now: dt.datetime | None = None) -> CheckResult:
    now = now or dt.datetime.now(dt.UTC)
    res = CheckResult(name, None)
    try:
        res.info = store.info(name)
        certs = x509.load_pem_x509_certificates(store.cert_path(name).read_bytes())
    except (CertStoreError, OSError, ValueError) as e:
        res.problems.append(str(e))
        return res
    leaf = certs[0]
    try:
        key = serialization.load_pem_private_key(store.key_path(name).read_bytes(), None)
        fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        res.key_matches = leaf.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)
    except FileNotFoundError:
        res.problems.append("no private key in the store")
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        res.problems.append(f"the private key cannot be read: {e}")
    if not res.key_matches and not res.problems:
        res.problems.append("the private key does not belong to the certificate")
    res.validity = validity_problems(certs, now)
    res.problems += res.validity
    res.valid_now = not res.validity
    chain_ok = True
    for i in range(len(certs) - 1):
        if not _signed_by(certs[i], certs[i + 1]):
            chain_ok = False
            res.problems.append(f"chain certificate {i + 1} did not issue certificate {i} (name or signature)")
        try:
            bc = certs[i + 1].extensions.get_extension_for_class(x509.BasicConstraints).value
            if not bc.ca:
                chain_ok = False
                res.problems.append(f"chain certificate {i + 1} is not a CA")
        except x509.ExtensionNotFound:
            res.warnings.append(f"chain certificate {i + 1} has no basic constraints")
    res.chain_ok = chain_ok
    top = certs[-1]
    for path, anchor in _load_anchors(anchors):
        if _signed_by(top, anchor) or top == anchor:
            res.anchored = str(path)
            break
    if res.anchored is None:
        res.warnings.append("the chain does not end in a trust anchor known here (the SMGW decides)")
    kt, _ = key_description(leaf.public_key())
    if not isinstance(leaf.public_key(), ec.EllipticCurvePublicKey):
        res.warnings.append(f"{kt} key: TR-03116-3 asks for ECDSA (brainpool or NIST curves)")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            res.warnings.append("the certificate is not marked for TLS client authentication")
    except x509.ExtensionNotFound:
        pass
    if res.info is not None and 0 <= res.info.days_left(now) < 30:
        res.warnings.append(f"expires in {res.info.days_left(now):.0f} days")
    return res


class LinkControl(Protocol):
    """What the switcher needs of the running link (smgw-link's service object)."""

    def reload_certificate(self) -> int: ...  # re-read the active certificate, rebuild; the link generation
    def probe_result(self, generation: int) -> tuple[bool | None, str | None]: ...  # ok?, last error


SwitchState = Literal["idle", "switching", "done", "fell_back", "failed"]


@dataclass
class SwitchStatus:
    state: SwitchState = "idle"
    to: str | None = None
    previous: str | None = None
    by: str | None = None
    started: dt.datetime | None = None
    finished: dt.datetime | None = None
    timeout_s: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Switcher:
    """One switch-over at a time. Its state is kept in ``state_path`` (when given), so that a
    switch-over interrupted by a restart is watched again - with a fresh timeout - and still falls
    back when the new certificate does not work."""

    def __init__(self, store_of: Callable[[], CertStore], link_of: Callable[[], LinkControl | None],
                 audit: Callable[[str, str, Any], Awaitable[None] | None],
                 state_path: Callable[[], Path | None] = lambda: None) -> None:
        self.store_of = store_of
        self.link_of = link_of
        self.audit = audit  # (result, target, detail)
        self.state_path = state_path
        self.status = SwitchStatus()
        self.task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self, name: str, previous: str | None, by: str, timeout_s: float, force: bool = False) -> SwitchStatus:
        """Select ``name`` (outside its validity period only with ``force``) and watch the link come up."""
        store = self.store_of()
        link = self.link_of()
        if link is None:
            raise RuntimeError("the SMGW link is not running")
        problems = validity_problems(store.certificates(name))  # refused before anything is saved
        if problems and not force:
            raise CertValidityError(name, problems, "selected")
        self.status = SwitchStatus("switching", name, previous, by, dt.datetime.now(dt.UTC), None, timeout_s)
        self._save()  # before the selection: a crash in between resumes (and falls back) on restart
        store.select(name, force=force)
        gen = link.reload_certificate()
        log.info("certificate switch-over started", certificate=name, previous=previous, timeout_s=timeout_s)
        self.task = asyncio.create_task(self._watch(timeout_s, link, gen), name="smgw-link.cert-switch")
        return self.status

    def resume(self) -> bool:
        """Watch a switch-over that a restart interrupted (state ``switching`` in the state file)."""
        path = self.state_path()
        if path is None or not path.exists() or self.busy:
            return False
        try:
            data = json.loads(path.read_text())
            st = SwitchStatus(**{k: v for k, v in data.items() if k in SwitchStatus.__dataclass_fields__})
            for k in ("started", "finished"):
                v = getattr(st, k)
                setattr(st, k, dt.datetime.fromisoformat(v) if isinstance(v, str) else None)
        except (OSError, ValueError, TypeError) as e:
            log.error("certificate switch-over state unreadable, ignored", path=str(path), error=str(e))
            return False
        self.status = st
        if st.state != "switching" or st.to is None:
            return False
        timeout = float(st.timeout_s or 60)
        log.warning("resuming a certificate switch-over interrupted by a restart", certificate=st.to,
                    previous=st.previous, timeout_s=timeout)
        try:
            self.store_of().select(st.to, force=True)  # chosen before the restart; a failure falls back
        except (CertStoreError, OSError) as e:
            log.error("the certificate of the interrupted switch-over is gone", certificate=st.to, error=str(e))
        self.task = asyncio.create_task(self._watch(timeout, None, -1), name="smgw-link.cert-switch")
        return True

    def _save(self) -> None:
        path = self.state_path()
        if path is None:
            return
        try:
            write_private(path, json.dumps(self.status.as_dict(), default=str))  # who switched: 0600
        except OSError as e:
            log.error("certificate switch-over state not saved", path=str(path), error=str(e))

    async def _watch(self, timeout_s: float, link0: LinkControl | None, gen: int) -> None:
        st = self.status
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        error: str | None = None
        anchor: tuple[LinkControl | None, int] = (link0, gen)
        while loop.time() < deadline:
            link = self.link_of()
            if link is not None:
                if link is not anchor[0]:  # the link was restarted (or not there yet): probe again
                    anchor = (link, link.reload_certificate())
                ok, error = link.probe_result(anchor[1])
                if ok:
                    st.state, st.finished = "done", dt.datetime.now(dt.UTC)
                    self._save()
                    log.info("certificate switch-over done: the link is up with the new certificate",
                             certificate=st.to)
                    await self._audit("accepted", st)
                    return
            await asyncio.sleep(0.05)
        st.error = error or "the link did not come up in time"
        log.error("certificate switch-over failed, switching back", certificate=st.to, previous=st.previous,
                  error=st.error)
        try:
            store = self.store_of()
            if st.previous is not None:
                store.select(st.previous, force=True)  # what was there before, as it was
            else:
                (store.root / "selected").unlink(missing_ok=True)
            link = self.link_of()
            if link is not None:
                link.reload_certificate()
            st.state = "fell_back"
        except (CertStoreError, OSError) as e:
            st.state = "failed"
            st.error = f"{st.error}; switching back failed too: {e}"
            log.error("switching back to the previous certificate failed", previous=st.previous, error=str(e))
        st.finished = dt.datetime.now(dt.UTC)
        self._save()
        await self._audit("failed", st)

    async def _audit(self, result: str, st: SwitchStatus) -> None:
        res = self.audit(result, st.to or "", {"state": st.state, "previous": st.previous, "error": st.error,
                                               "by": st.by})
        if asyncio.iscoroutine(res):
            await res

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
