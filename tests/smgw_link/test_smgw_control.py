"""Operator control state (limits, failsafe, AVAIL, TARIF) and the certificate store."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from chargegate import payloads as p
from chargegate.config.smgw import Smgw
from smgw_link.certstore import CertStore, CertStoreError
from smgw_link.control import OperatorControl
from smgw_link.pki import make_pki

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def cfg(**kw: object) -> Smgw:
    base: dict[str, object] = {"enabled": True, "gateway": {"host": "127.0.0.1", "pinned_sha256": "ab" * 32},
                               "functions": {"power_reduction": True, "tariffs": True}, "link_loss_grace_s": 120,
                               "failsafe_duration_s": 7200, "limit_heartbeat_s": 30, "limit_hold_s": 120}
    base.update(kw)
    return Smgw.model_validate(base)


events = st.lists(st.tuples(
    st.sampled_from(["limit", "failsafe", "link_up", "link_down", "avail", "tick"]),
    st.integers(0, 20000),  # W or percent
    st.one_of(st.none(), st.integers(1, 5000)),  # duration
    st.floats(0, 3000)), max_size=25)


@settings(max_examples=200, deadline=None)
@given(evs=events, on_link_loss=st.sampled_from(["failsafe", "keep"]), power_reduction=st.booleans())
def test_published_limits_always_expire_and_follow_the_rules(evs: list, on_link_loss: str,
                                                             power_reduction: bool) -> None:
    c = cfg(on_link_loss=on_link_loss, functions={"power_reduction": power_reduction})
    oc = OperatorControl.load(c, None, T0)
    now = T0
    for kind, value, duration, dt in evs:
        now += timedelta(seconds=dt)
        if kind == "limit":
            oc.set_limit(value, True, duration, now)
        elif kind == "failsafe":
            oc.set_failsafe(value)
        elif kind in ("link_up", "link_down"):
            oc.set_link(kind == "link_up", now)
        elif kind == "avail":
            oc.set_avail("local", min(value, 100), now, duration)
        oc.tick(now)
        out = oc.outputs(now)
        for gl in out.limits.values():
            # rule 2: every limit expires, at most limit_hold_s ahead
            assert now < gl.valid_until <= now + timedelta(seconds=c.limit_hold_s)
            if gl.active:
                assert gl.power_w is not None and gl.power_w >= 0
        dso = out.limits["dso"]
        if not power_reduction:
            assert not dso.active and dso.failsafe_power_w is None and not out.failsafe
        if out.failsafe:
            assert on_link_loss == "failsafe" and power_reduction
            assert dso.active and dso.power_w == oc.failsafe_power_w and dso.id == "failsafe"
        elif dso.active:
            assert oc.lpc is not None and dso.power_w == oc.lpc.value_w
            if oc.lpc.ends is not None:
                assert now < oc.lpc.ends and dso.valid_until <= oc.lpc.ends


def test_failsafe_after_grace_until_new_limit_or_duration() -> None:
    oc = OperatorControl.load(cfg(), None, T0)
    oc.set_link(True, T0)
    oc.set_failsafe(4800)
    oc.set_limit(3000, True, None, T0)
    oc.set_link(False, T0 + timedelta(seconds=10))
    oc.tick(T0 + timedelta(seconds=129))
    assert not oc.in_failsafe and oc.outputs(T0 + timedelta(seconds=129)).limits["dso"].power_w == 3000
    assert oc.next_deadline(T0 + timedelta(seconds=129)) == T0 + timedelta(seconds=130)
    oc.tick(T0 + timedelta(seconds=130))
    out = oc.outputs(T0 + timedelta(seconds=130))
    assert oc.in_failsafe and out.limits["dso"].power_w == 4800 and out.limits["dso"].id == "failsafe"
    # the link comes back: still failsafe until a limit arrives (LPC)
    oc.set_link(True, T0 + timedelta(seconds=200))
    oc.tick(T0 + timedelta(seconds=200))
    assert oc.in_failsafe
    oc.set_limit(5000, True, None, T0 + timedelta(seconds=201))
    assert not oc.in_failsafe
    assert oc.outputs(T0 + timedelta(seconds=201)).limits["dso"].power_w == 5000
    # a second outage without a new limit: failsafe ends after its duration -> autonomous
    oc.set_link(False, T0 + timedelta(seconds=300))
    oc.tick(T0 + timedelta(seconds=420))
    assert oc.in_failsafe
    oc.tick(T0 + timedelta(seconds=420 + 7200))
    assert not oc.in_failsafe and not oc.outputs(T0 + timedelta(seconds=7620)).limits["dso"].active
    oc.tick(T0 + timedelta(seconds=20000))
    assert not oc.in_failsafe  # not re-entered in the same outage


def test_keep_on_link_loss_and_disabled_smgw() -> None:
    oc = OperatorControl.load(cfg(on_link_loss="keep"), None, T0)
    oc.set_limit(3000, True, None, T0)
    oc.tick(T0 + timedelta(hours=5))
    assert not oc.in_failsafe and oc.outputs(T0 + timedelta(hours=5)).limits["dso"].power_w == 3000


def test_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "operator.json"
    oc = OperatorControl.load(cfg(), path, T0)
    oc.set_limit(3500, True, 600, T0, "m-1")
    oc.set_failsafe(4600)
    oc.set_avail("local", 30, T0)
    oc.set_tarif("local", 1, T0, 3600)
    again = OperatorControl.load(cfg(), path, T0 + timedelta(seconds=10))
    out = again.outputs(T0 + timedelta(seconds=10))
    assert out.limits["dso"].power_w == 3500 and out.limits["dso"].failsafe_power_w == 4600
    assert out.limits["local"].power_w == 7200
    assert out.tariff.period.level == p.TariffLevel.LOW
    path.write_text("{broken")
    assert OperatorControl.load(cfg(), path, T0).lpc is None  # logged, not fatal



@pytest.mark.parametrize("field,value", [("value_w", 10_000_001), ("value_w", -1),
                                         ("failsafe_w", 10_000_001), ("failsafe_w", "4600")])
def test_state_file_with_a_power_out_of_range_is_unreadable(tmp_path: Path, field: str, value: object) -> None:
    """A stored power outside what the bus carries (an older version's state, a hand edit): the file is
    unreadable (logged, started without it) instead of every output cycle failing in GridLimit."""
    path = tmp_path / "operator.json"
    oc = OperatorControl.load(cfg(), path, T0)
    oc.set_limit(3500, True, None, T0, "m-1")
    oc.set_failsafe(4600)
    data = json.loads(path.read_text())
    if field == "value_w":
        data["lpc"]["value_w"] = value
    else:
        data["failsafe_w"] = value
    path.write_text(json.dumps(data))
    with capture_logs() as logs:
        again = OperatorControl.load(cfg(), path, T0)
    assert again.lpc is None and again.failsafe_w is None
    assert any(e["event"] == "operator state file unreadable, starting without it" and "W outside" in e["error"]
               for e in logs), logs
    again.outputs(T0)

def test_tariff_schedule_switches_periods() -> None:
    oc = OperatorControl.load(cfg(), None, T0)
    low = p.TariffPeriod(id="night", level=p.TariffLevel.LOW, start=T0 + timedelta(hours=1),
                         end=T0 + timedelta(hours=2))
    oc.set_schedule([low])
    oc.set_link(True, T0)
    assert oc.tariff_now(T0).period.level == p.TariffLevel.NORMAL
    assert oc.next_deadline(T0) == low.start
    assert oc.tariff_now(T0 + timedelta(minutes=61)).period.id == "night"
    assert oc.tariff_now(T0 + timedelta(hours=2)).period.level == p.TariffLevel.NORMAL


# -- certificate store ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_pki(tmp_path_factory.mktemp("pki"), "brainpoolP256r1")


def test_import_list_select_and_key_mode(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = CertStore(tmp_path / "certs")
    info = store.import_pem("cls", pki.client_cert, pki.client_key)
    assert info.curve == "brainpoolP256r1" and info.key_type == "EC" and info.has_key
    assert stat.S_IMODE((tmp_path / "certs" / "cls" / "key.pem").stat().st_mode) == 0o600
    with pytest.raises(CertStoreError, match="does not belong"):
        store.import_pem("wrong", pki.gateway_cert, pki.client_key)
    with pytest.raises(CertStoreError, match="exists"):
        store.import_pem("cls", pki.client_cert, pki.client_key)
    with pytest.raises(CertStoreError, match="no certificate selected"):
        store.active(None)
    store.select("cls")
    assert store.active(None).name == "cls"
    # PKCS#12 with a password, the expired one shows as expired
    from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, load_pem_private_key

    key = load_pem_private_key(pki.expired_key.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(pki.expired_cert.read_bytes())
    blob = pkcs12.serialize_key_and_certificates(b"old", key, cert, None,  # type: ignore[arg-type]
                                                 BestAvailableEncryption(b"pw"))
    (tmp_path / "old.p12").write_bytes(blob)
    with pytest.raises(CertStoreError, match="wrong password"):
        store.import_file("old", tmp_path / "old.p12", password="nope")
    with pytest.raises(CertStoreError, match="has expired: notAfter"):
        store.import_file("old", tmp_path / "old.p12", password="pw")
    old = store.import_file("old", tmp_path / "old.p12", password="pw", force=True)
    assert old.expired()
    names = [i.name for i in store.list() if not isinstance(i, str)]
    assert names == ["cls", "old"]
    with pytest.raises(CertStoreError):
        store.select("../etc")


@pytest.mark.parametrize("curve", ["brainpoolP256r1", "P-256"])
def test_request_makes_key_and_csr(tmp_path: Path, curve: str) -> None:
    store = CertStore(tmp_path / "certs")
    pem = store.request("new", "cls-device-42", curve, "Installer", "DE", ("cls.local",))
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    assert csr.public_key().curve.name == {"P-256": "secp256r1"}.get(curve, curve)  # type: ignore[union-attr]
    assert stat.S_IMODE((tmp_path / "certs" / "new" / "key.pem").stat().st_mode) == 0o600
    assert store.list() == ["new"]  # pending
    with pytest.raises(CertStoreError, match="already has a key"):
        store.request("new", "x", curve)


def test_cli_register_and_commands(pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import argparse

    from smgw_link.cli import register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command"))
    store = str(tmp_path / "s")
    args = ap.parse_args(["cert", "import", "a", str(pki.client_cert), "--key", str(pki.client_key), "--store", store])
    assert args.func(args) == 0
    args = ap.parse_args(["cert", "list", "--store", store])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "brainpoolP256r1" in out and "* a" in out and "PRIVATE" not in out
    args = ap.parse_args(["cert", "select", "missing", "--store", store])
    assert args.func(args) == 1


def test_cli_refuses_expired_and_not_yet_valid_certificates_unless_forced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cert import` of an expired certificate exited 0, `cert select` only warned: both refuse (exit 1) one
    that has expired or is not valid yet, saying notAfter/notBefore, and accept it with --force."""
    import argparse

    from smgw_link.cli import register
    from smgw_link.pki import cert_pem, issue, key_pem, new_key

    now = datetime.now(UTC)
    ca = issue("Device CA", new_key("P-256"), ca=True)
    made = {"past": issue("cls", new_key("P-256"), ca, client=True, not_before=now - timedelta(days=400),
                          not_after=now - timedelta(days=2)),
            "future": issue("cls", new_key("P-256"), ca, client=True, not_before=now + timedelta(days=3),
                            not_after=now + timedelta(days=300)),
            "good": issue("cls", new_key("P-256"), ca, client=True)}
    for name, item in made.items():
        (tmp_path / f"{name}.pem").write_bytes(cert_pem(item.cert) + key_pem(item.key))
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command"))
    store = str(tmp_path / "store")

    def cert(*argv: str) -> tuple[int, str]:
        args = ap.parse_args(["cert", *argv, "--store", store])
        code = args.func(args)
        return code, capsys.readouterr().err

    for name, said in (("past", f"has expired: notAfter {made['past'].cert.not_valid_after_utc:%Y-%m-%d}"),
                       ("future", f"not valid yet: notBefore {made['future'].cert.not_valid_before_utc:%Y-%m-%d}")):
        code, err = cert("import", name, str(tmp_path / f"{name}.pem"))
        assert code == 1 and said in err and "--force" in err, err
        assert name not in CertStore(Path(store)).names()
    assert cert("import", "good", str(tmp_path / "good.pem")) == (0, "")  # the only one: selected
    code, err = cert("import", "past", str(tmp_path / "past.pem"), "--force")
    assert code == 0 and "warning" in err and "notAfter" in err
    assert CertStore(Path(store)).selected() == "good"  # a forced import does not replace the selection
    code, err = cert("select", "past")
    assert code == 1 and "past not selected" in err and "notAfter" in err and "--force" in err, err
    assert CertStore(Path(store)).selected() == "good"
    code, err = cert("select", "past", "--force")
    assert code == 0 and "notAfter" in err and CertStore(Path(store)).selected() == "past"
