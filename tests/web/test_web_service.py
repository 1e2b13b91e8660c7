"""The web service against the real Mosquitto (its own account and ACL) with the history service running:
a login is needed, the login form and every change are CSRF-protected, the live stream follows the bus
(an operator limit raised to the §14a floor, a car plugged in), a charging mode set on the page goes through
the history service's command path, the record's CSV export, viewing open on the LAN, and TLS with Secure
cookies (certificate made in the test)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from web_support import CONFIG, Client, Running, events, ha_broker, start_history, start_web, until, write_config

from chargegate import payloads as p
from chargegate import record as rec
from chargegate.broker import LocalBroker, free_port
from chargegate.bus import Bus, Message
from chargegate.record_export import SESSION_COLUMNS
from conftest import BrokerHandle, connected_bus, health_seen


class Rig:
    broker: LocalBroker
    handle: BrokerHandle
    path: Path
    web: Running
    history: Running
    poller: Bus
    lc: Bus
    smgw: Bus
    observer: Bus
    sent: list[p.ModeCommand]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web.svc.http.port}"


@pytest.fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("web")
    r = Rig()
    r.broker, r.handle = ha_broker(tmp)
    r.path = write_config(tmp, r.handle.port, free_port())
    r.history = await start_history(r.path)
    r.web = await start_web(r.path)
    r.poller = await connected_bus(r.handle, "evse-poller")
    r.lc = await connected_bus(r.handle, "load-controller")
    r.smgw = await connected_bus(r.handle, "smgw-link")
    r.observer = await connected_bus(r.handle, "observer")
    r.sent = []

    def on_set(m: Message) -> None:
        assert isinstance(m.payload, p.ModeCommand)
        r.sent.append(m.payload)

    r.observer.subscribe("evse.mode_set", on_set)
    try:
        yield r
    finally:
        for b in (r.poller, r.lc, r.smgw, r.observer):
            await b.stop()
        await r.web.stop()
        await r.history.stop()
        r.broker.discard()


async def test_every_view_needs_a_login(rig: Rig) -> None:
    c = Client(rig.base)
    r = await c.get("/")
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert "script-src 'self'" in r.headers["content-security-policy"] and r.headers["cache-control"] == "no-store"
    for path in ("/events", "/api/series", "/export/sessions.csv"):
        assert (await c.get(path)).status_code == 401, path
    assert (await c.post("/evses/w1/mode", data={"mode": "now"})).status_code == 401
    assert (await c.get("/healthz")).text == "ok"
    login = await c.get("/login")
    assert login.status_code == 200 and 'name="password"' in login.text
    assert "HttpOnly" in login.headers["set-cookie"] and "SameSite=strict" in login.headers["set-cookie"]
    assert "Secure" not in login.headers["set-cookie"]  # plain HTTP: a Secure cookie would never come back


async def test_login_form_is_csrf_protected_and_failures_are_throttled(rig: Rig) -> None:
    c = Client(rig.base)
    r = await c.post("/login", data={"name": "anna", "password": "secret-a", "csrf": "guess"})
    assert r.status_code == 403 and "expired" in r.text  # no pre-login cookie: refused
    r = await c.post("/login", data={"name": "anna", "password": "secret-a"}, headers={"Origin": "http://evil.test"})
    assert r.status_code == 403
    try:
        for _ in range(3):
            assert (await c.login("anna", "wrong")).status_code == 401
        r = await c.login("anna", "secret-a")  # the right password, but this address must wait now
        assert r.status_code == 429 and "Too many failed logins" in r.text
        assert rig.web.ctx.counters["logins_failed"] >= 3 and rig.web.ctx.counters["logins_throttled"] >= 1
    finally:
        rig.web.svc.throttle.failures.clear()
    r = await c.login("anna", "secret-a")
    assert r.status_code == 303 and "cg_session=" in r.headers["set-cookie"]
    assert (await c.get("/")).status_code == 200 and c.csrf


async def test_the_live_page_follows_the_bus(rig: Rig) -> None:
    c = Client(rig.base)
    await c.login("ben", "secret-b")
    now = p.utcnow()
    async with events(c, rig.web.svc) as ev:
        await until("the first event", lambda: ev.sections().get("evses"))
        assert ev.status == 200
        # a car is plugged in and charges; the operator's limit arrives and the controller raises it to the floor
        rig.poller.publish("evse.status", p.EvseStatus(evse_id="w1", online=True, state="charging", iec_state="C",
                                                       current_a=[9.5, 9.4, 9.6], power_w=6520.0, energy_wh=1200.0,
                                                       session=p.Session(id="s-w1", started=now, energy_start_wh=1000.0,
                                                                         energy_wh=200.0, id_tag="CARD-W1"),
                                                       source="evse-poller"), evse_id="w1")
        rig.smgw.publish("grid.limit", p.GridLimit(source="dso", active=True, power_w=4000.0, scope="controllable",
                                                   valid_until=now + timedelta(seconds=120), reason="LPC test"),
                         source="dso")
        rig.lc.publish("controller.allocation", p.Allocation(cycle=1, evses=[
            p.EvseAllocation(evse_id="w1", current_a=9.5, phases=3, bound_by="§14a_floor",
                             detail="dso limit 4000 W raised to the §14a floor 6720 W")],
            limits={"grid_limits": [{"source": "dso", "power_w": 4000, "effective_w": 6720.0, "raised_to_floor": True}],
                    "floor_14a_w": 6720.0, "controllable_evses": 2}))
        secs = await until("the limit, the floor and the charging car on the page", lambda: (
            (s := ev.sections()) and 'id="limit-dso" class="limit on"' in s.get("limits", "")
            and 'data-applies="yes"' in s.get("limits", "") and 'data-state="charging"' in s.get("evses", "") and s))
        assert "4.00 kW on the controllable devices" in secs["limits"] and "6.72 kW" in secs["limits"]
        card = secs["evses"].split('id="evse-w1"', 1)[1].split("</article>", 1)[0]
        assert "9.5 / 9.4 / 9.6 A" in card and "9.5 A × 3" in card and "below the §14a floor: raised to 6720 W" in card
        assert "<form" not in card  # ben is a viewer: no mode form
        # the circuit tree shows the garage's phases from what the wallbox draws
        assert 'data-phase="L1" data-load="9.50"' in secs["circuits"].split('id="node-garage"', 1)[1]
        # the limit ends: the page says so without a reload
        rig.smgw.publish("grid.limit", p.GridLimit(source="dso", active=False, valid_until=now + timedelta(seconds=60)),
                         source="dso")
        await until("the limit gone", lambda: 'id="limit-dso" class="limit off"' in ev.sections().get("limits", ""))
    page = await c.get("/")
    assert page.status_code == 200 and 'id="evse-w1" data-state="charging"' in page.text


async def test_a_mode_set_on_the_page_goes_through_the_history_service(rig: Rig) -> None:
    anna, ben = Client(rig.base), Client(rig.base)
    await anna.login("anna", "secret-a")
    await ben.login("ben", "secret-b")
    page = (await anna.get("/")).text
    assert 'action="/evses/w1/mode"' in page and f'name="csrf" value="{anna.csrf}"' in page
    json_h = {"Accept": "application/json"}
    # refused: no token, a wrong token, another site, a viewer, an unknown wallbox, an unknown mode, a huge body
    assert (await anna.post("/evses/w1/mode", data={"mode": "now"}, headers=json_h)).status_code == 403
    assert (await anna.post("/evses/w1/mode", data={"mode": "now", "csrf": "x" * 43})).status_code == 403
    assert (await anna.post("/evses/w1/mode", data={"mode": "now", "csrf": anna.csrf},
                            headers={"Origin": "http://evil.test"})).status_code == 403
    assert (await ben.post("/evses/w1/mode", data={"mode": "now", "csrf": ben.csrf})).status_code == 403
    hdr = {"X-CSRF-Token": anna.csrf}
    assert (await anna.post("/evses/nope/mode", data={"mode": "now"}, headers=hdr)).status_code == 404
    r = await anna.post("/evses/w1/mode", data={"mode": "fast"}, headers=hdr)
    assert r.status_code == 422 and "solar+min" in r.json()["detail"]
    assert (await anna.post("/evses/w1/mode", data={"mode": "now", "x": "y" * 5000}, headers=hdr)).status_code == 413
    assert not rig.sent  # nothing refused reached the bus
    # accepted: on the bus as the web account's command, confirmed by the history service, kept in its record
    r = await anna.post("/evses/w1/mode", data={"mode": "solar+min"}, headers=hdr)
    assert r.status_code == 200, r.text
    assert r.json() == {"evse_id": "w1", "mode": "solar+min", "confirmed": True, "set_by": "web:anna"}
    await until("the command seen on the bus", lambda: rig.sent)
    assert rig.sent[-1].source == "web:anna" and rig.sent[-1].mode is p.ChargingModeName.SOLAR_MIN
    conn = rec.open_db(rig.history.svc.path, readonly=True)
    try:
        assert rec.modes(conn)["w1"].mode == "solar+min"
    finally:
        conn.close()
    # without JavaScript: a plain form post (token in the form) answers with a redirect to the page
    r = await anna.post("/evses/w1/mode", data={"mode": "rules", "csrf": anna.csrf})
    assert r.status_code == 303 and r.headers["location"] == "/"
    await until("rules again", lambda: rig.web.svc.state.modes["w1"].mode is p.ChargingModeName.RULES)
    page = (await anna.get("/")).text
    assert 'id="evse-w1" data-state="charging" data-mode="rules"' in page
    # log out: the session and its token are gone
    assert (await anna.post("/logout", data={"csrf": anna.csrf})).status_code == 303
    assert (await anna.post("/evses/w1/mode", data={"mode": "now"}, headers=hdr)).status_code == 401


async def test_the_csv_export_of_the_record(rig: Rig) -> None:
    c = Client(rig.base)
    await c.login("ben", "secret-b")
    r = await c.get("/export/sessions.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    text = r.content.decode("utf-8")
    assert text.startswith("\ufeff" + ";".join(SESSION_COLUMNS))  # the German-spreadsheet style by default
    assert "w1" in text  # the session of the car plugged in above, as the history service recorded it
    assert (await c.get("/export/other.csv")).status_code == 404
    assert (await c.get("/export/controls.csv?from=2026-13")).status_code == 422
    r = await c.get("/api/series?node=grid&hours=24")
    assert r.status_code == 200 and r.json()["fuse"] == [35.0, 35.0, 35.0]
    assert (await c.get("/api/series?node=nowhere")).status_code == 404
    assert (await c.get("/api/series?hours=1e9")).status_code == 422


async def test_the_web_service_reports_its_health(rig: Rig) -> None:
    h = await health_seen(rig.handle, rig.web.ctx, lambda h: h.counters.get("logins", 0) >= 1)
    assert h.status is p.HealthStatus.ONLINE and h.counters["page_views"] >= 1


def _tls_files(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, made here."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
          .not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "web.pem", tmp / "web.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


async def test_lan_viewing_and_tls_with_secure_cookies(rig: Rig, tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    text = CONFIG.replace("  login_attempts: 3\n", f"  login_attempts: 3\n  view: lan\n"
                                                  f"  tls: {{{{cert_file: {cert}, key_file: {key}}}}}\n")
    path = write_config(tmp_path, rig.handle.port, free_port(), text, state=rig.path.parent / "state")
    lan = await start_web(path)
    try:
        c = Client(f"https://127.0.0.1:{lan.svc.http.port}", verify=str(ca))
        r = await c.get("/")  # no login: 127.0.0.1 is on the LAN, viewing is open
        assert r.status_code == 200 and 'id="sec-evses"' in r.text
        assert "<form class=\"mode-form\"" not in r.text and 'href="/login">Log in</a> to change' in r.text
        assert r.headers["strict-transport-security"].startswith("max-age=")
        assert (await c.get("/export/sessions.csv")).status_code == 401  # personal data: only with a login
        assert (await c.post("/evses/w1/mode", data={"mode": "now"})).status_code == 401
        login = await c.get("/login")
        assert "Secure" in login.headers["set-cookie"]
        r = await c.login("anna", "secret-a")
        assert r.status_code == 303 and re.search(r"cg_session=[^;]+;.*Secure", r.headers["set-cookie"])
        assert 'class="mode-form"' in (await c.get("/")).text
        # a plain-HTTP client gets nothing: the listener speaks TLS only
        with pytest.raises(Exception):  # noqa: B017 - requests raises its ConnectionError family
            await Client(f"http://127.0.0.1:{lan.svc.http.port}").get("/")
    finally:
        await lan.stop()
    await asyncio.sleep(0)
