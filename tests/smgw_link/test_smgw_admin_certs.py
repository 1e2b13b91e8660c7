"""Certificate check and the switch-over state machine with a link stand-in: fall-back on timeout,
a link that restarts during the switch-over, a switch-over interrupted by a process restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from smgw_link.admin.certs import Switcher, check
from smgw_link.certstore import CertStore
from smgw_link.pki import Pki, cert_pem, issue, key_pem, make_pki, new_key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "brainpoolP256r1")


def store_with(tmp: Path, pki: Pki) -> CertStore:
    store = CertStore(tmp / "store")
    store.import_pem("old", pki.client_cert, pki.client_key)
    store.import_pem("new", pki.client_cert, pki.client_key)
    store.select("old")
    return store


class FakeLink:
    """The link as the switcher sees it: each reload starts a generation; probes succeed or fail."""

    def __init__(self, store: CertStore, works_with: set[str]) -> None:
        self.store = store
        self.works_with = works_with
        self.gen = 0
        self.reloads: list[str | None] = []

    def reload_certificate(self) -> int:
        self.gen += 1
        self.reloads.append(self.store.selected())
        return self.gen

    def probe_result(self, generation: int) -> tuple[bool | None, str | None]:
        if generation != self.gen:
            return None, None
        if self.store.selected() in self.works_with:
            return True, None
        return False, "tls: TLS alert 'unknown ca'"


async def test_fall_back_when_the_new_certificate_does_not_work(tmp_path: Path, pki: Pki) -> None:
    store = store_with(tmp_path, pki)
    link = FakeLink(store, {"old"})
    audits: list[tuple[str, str, Any]] = []
    sw = Switcher(lambda: store, lambda: link, lambda r, t, d: audits.append((r, t, d)),
                  lambda: tmp_path / "switch.json")
    st = sw.start("new", "old", "alice", 0.3)
    assert st.state == "switching" and store.selected() == "new"
    assert json.loads((tmp_path / "switch.json").read_text())["state"] == "switching"
    await sw.task  # type: ignore[misc]
    assert sw.status.state == "fell_back" and "unknown ca" in (sw.status.error or "")
    assert store.selected() == "old" and link.reloads == ["new", "old"]
    assert audits == [("failed", "new", {"state": "fell_back", "previous": "old", "error": sw.status.error,
                                         "by": "alice"})]
    assert json.loads((tmp_path / "switch.json").read_text())["state"] == "fell_back"


async def test_a_link_restarted_during_the_switch_over_is_probed_again(tmp_path: Path, pki: Pki) -> None:
    store = store_with(tmp_path, pki)
    first, second = FakeLink(store, set()), FakeLink(store, {"new"})
    current = [first]
    audits: list[tuple[str, str, Any]] = []
    sw = Switcher(lambda: store, lambda: current[0], lambda r, t, d: audits.append((r, t, d)))
    sw.start("new", "old", "alice", 5)
    await asyncio.sleep(0.2)
    assert sw.status.state == "switching"
    current[0] = second  # smgw-link restarted its link (a changed smgw section)
    await asyncio.wait_for(sw.task, 2)  # type: ignore[arg-type]
    assert sw.status.state == "done" and store.selected() == "new" and second.reloads == ["new"]
    assert audits[0][0] == "accepted"


async def test_a_switch_over_interrupted_by_a_restart_is_resumed(tmp_path: Path, pki: Pki) -> None:
    store = store_with(tmp_path, pki)
    state = tmp_path / "switch.json"
    audits: list[tuple[str, str, Any]] = []
    crashed = Switcher(lambda: store, lambda: FakeLink(store, set()), lambda r, t, d: None, lambda: state)
    crashed.start("new", "old", "alice", 60)
    crashed.task.cancel()  # type: ignore[union-attr]  # the process died here
    saved = json.loads(state.read_text())
    assert saved["state"] == "switching" and saved["timeout_s"] == 60
    state.write_text(json.dumps({**saved, "timeout_s": 0.5}))  # (a short timeout for the test)
    # after the restart the link is not there at first, then it is - and the new certificate fails
    link: list[FakeLink | None] = [None]
    sw = Switcher(lambda: store, lambda: link[0], lambda r, t, d: audits.append((r, t, d)), lambda: state)
    assert sw.resume()
    assert sw.status.state == "switching" and sw.status.to == "new" and sw.status.by == "alice"
    await asyncio.sleep(0.1)
    link[0] = FakeLink(store, {"old"})
    await asyncio.wait_for(sw.task, 5)  # type: ignore[arg-type]
    assert sw.status.state == "fell_back" and store.selected() == "old"
    assert audits and audits[0][0] == "failed"
    # nothing to resume any more
    assert not Switcher(lambda: store, lambda: None, lambda r, t, d: None, lambda: state).resume()


def test_check_names_each_problem(tmp_path: Path, pki: Pki) -> None:
    store = CertStore(tmp_path / "store")
    store.import_pem("good", pki.client_cert, pki.client_key)
    res = check(store, "good", [pki.gateway_ca])
    assert res.usable and res.key_matches and res.valid_now and res.chain_ok
    assert res.anchored is None and any("trust anchor" in w for w in res.warnings)  # the device CA is not known here
    res = check(store, "good", [pki.device_ca])
    assert res.anchored == str(pki.device_ca)
    store.import_pem("expired", pki.expired_cert, pki.expired_key, force=True)
    res = check(store, "expired", [])
    assert not res.usable and not res.valid_now and "expired" in res.problems[0] and "notAfter" in res.problems[0]
    assert res.validity == res.problems
    # a chain whose second certificate did not issue the first
    ca = issue("Some CA", new_key("P-256"), ca=True)
    other = issue("other", new_key("P-256"), ca)
    d = tmp_path / "store" / "broken"
    d.mkdir()
    (d / "cert.pem").write_bytes(pki.client_cert.read_bytes() + cert_pem(ca.cert))
    (d / "key.pem").write_bytes(pki.client_key.read_bytes())
    res = check(store, "broken", [])
    assert not res.usable and not res.chain_ok and "did not issue" in res.problems[0]
    # a key that is not the certificate's
    d = tmp_path / "store" / "mismatch"
    d.mkdir()
    (d / "cert.pem").write_bytes(cert_pem(other.cert))
    (d / "key.pem").write_bytes(key_pem(new_key("P-256")))
    res = check(store, "mismatch", [])
    assert not res.usable and not res.key_matches and "does not belong" in res.problems[0]
    assert not check(store, "nonexistent", []).usable
