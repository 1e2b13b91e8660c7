"""The web page's pure parts: the words for states and reasons, the sections rendered from bus payloads (the
operator limit with its time left and the §14a floor, the wallbox with what it draws and why, the circuit
tree per phase against its fuse, the worst case for a silent meter), escaping of everything from outside,
the plot's data, the size of the page, and the login machinery (accounts, sessions, throttle, LAN rule)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate import record as rec
from web import render
from web import words as w
from web.app import STATIC
from web.auth import Sessions, Throttle, check_password, on_lan, same_origin
from web.state import LiveState

NOW = datetime(2026, 12, 5, 15, 0, tzinfo=UTC)
TZ = ZoneInfo("Europe/Berlin")

CONFIG = """
site: {name: Test house}
circuits:
  - id: grid
    name: house connection
    fuse_a: 35
    meter: gm
    children:
      - {id: garage, fuse_a: 25}
evses:
  - {id: a, name: Garage left, circuit: garage, modbus: {profile: alfen-eve, host: 127.0.0.1}}
  - {id: b, circuit: garage, phases: 1, phase_rotation: [2], ocpp: {charge_box_id: CB1}}
meters:
  - {id: gm, modbus: {profile: sdm630, host: 127.0.0.1}}
web:
  users:
    - {name: anna, role: admin, password: secret-a}
    - {name: ben, role: viewer, password: secret-b}
admin:
  tokens:
    - {name: installer, role: operator, token: tok-123}
"""


def cfg(text: str = CONFIG) -> cfgmod.Config:
    return cfgmod.loads(text)


def live() -> LiveState:
    s = LiveState()
    s.apply("evse.status", {"evse_id": "a"}, p.EvseStatus(
        evse_id="a", online=True, state="charging", current_a=[10.0, 10.0, 10.0], power_w=6900.0, ts=NOW))
    s.apply("evse.status", {"evse_id": "b"}, p.EvseStatus(
        evse_id="b", online=True, state="preparing", current_a=[0.0, 0.0, 0.0], ts=NOW))
    s.apply("grid.limit", {"source": "dso"}, p.GridLimit(
        source="dso", active=True, power_w=6000.0, scope="controllable", valid_until=NOW + timedelta(seconds=95),
        reason="CLS.EEDI LPC", ts=NOW))
    s.apply("controller.allocation", {}, p.Allocation(cycle=7, ts=NOW, evses=[
        p.EvseAllocation(evse_id="a", current_a=10.0, phases=3, bound_by="§14a_floor",
                         detail="dso limit 6000 W raised to the §14a floor 8400 W"),
        p.EvseAllocation(evse_id="b", current_a=0.0, phases=1, bound_by="mode:off",
                         detail="charging mode off (set by web:anna)")],
        limits={"grid_limits": [{"source": "dso", "power_w": 6000, "effective_w": 8400.0, "raised_to_floor": True}],
                "floor_14a_w": 8400.0, "controllable_evses": 2}))
    s.apply("meter.reading", {"meter_id": "gm"}, p.MeterReading(meter_id="gm", current_a=[14.0, 12.5, 11.0],
                                                                power_w=8500.0, ts=NOW))
    return s


def test_reasons_in_words() -> None:
    names = {"garage": "the garage"}
    assert w.reason_words("node:garage:L2", None, names) == "the fuse of the garage (phase L2) is fully used"
    assert w.reason_words("grid_limit:dso") == "the grid operator's limit applies"
    assert "§14a minimum" in w.reason_words("§14a_floor")
    assert w.reason_words("mode:off", "charging mode off (set by x)") == "charging mode off (set by x)"
    assert w.reason_words("min_current", "6 A do not fit") == ("not enough room for the minimum charging current "
                                                               "(min_current_a) - 6 A do not fit")
    assert w.reason_words("stale_meter") == "a meter is silent, so charging below it is paused"
    assert w.reason_words("rule:mode.solar.a") == "solar mode: only what the house exports"
    assert w.reason_words("evse_state:suspended") == "the car has paused charging (full, or its own timer)"
    assert w.reason_words("something_new") == "something_new"  # an unknown label is shown as it is
    assert w.time_left(NOW + timedelta(seconds=95), NOW) == "95 s left"
    assert w.time_left(NOW - timedelta(minutes=5), NOW) == "ended 5 min ago"


def test_limits_show_the_operator_limit_its_time_left_and_the_floor() -> None:
    html = render.limits_section(cfg(), live(), NOW, TZ)
    dso = re.search(r'<li id="limit-dso"[^>]*>(.*?)</li>', html)
    assert dso is not None and 'data-active="yes"' in html
    text = re.sub(r"<[^>]+>", "", dso.group(1))
    assert "6.00 kW on the controllable devices (§14a)" in text
    assert "16:01:35 (95 s left)" in text  # local time (Berlin) and what is left
    assert "raised to the §14a minimum of 8.40 kW" in text
    assert 'id="floor" data-applies="yes"' in html and "8.40 kW" in html
    # expired while still marked active: not shown as binding
    st = live()
    st.limits["dso"].valid_until = NOW - timedelta(seconds=1)
    assert '<li id="limit-dso" class="limit off" data-active="no"><b>Grid operator:</b> expired' in \
        render.limits_section(cfg(), st, NOW, TZ)


def test_wallbox_card_says_what_it_draws_what_it_gets_and_why() -> None:
    aud = render.Audience(logged_in=True, can_set=True, user="anna", csrf="tok")
    html = render.evses_section(cfg(), live(), NOW, TZ, aud)
    card = html.split('id="evse-a"', 1)[1].split("</article>", 1)[0]
    assert ">charging<" in card and "10.0 / 10.0 / 10.0 A" in card and "6.90 kW" in card
    assert "10 A × 3" in card and "limit of 6000 W is below the §14a floor: raised to 8400 W" in card
    b = html.split('id="evse-b"', 1)[1].split("</article>", 1)[0]
    assert "car plugged in, waiting" in b and "0 A (paused)" in b and "charging mode off" in b
    assert b.count("<option") == 5 and 'name="csrf" value="tok"' in b
    # a viewer sees no form; someone not logged in is told to log in
    assert "<form" not in render.evses_section(cfg(), live(), NOW, TZ, render.Audience(logged_in=True))
    assert 'href="/login"' in render.evses_section(cfg(), live(), NOW, TZ, render.Audience())


def test_circuit_tree_per_phase_against_the_fuse_and_a_silent_meter_is_the_worst_case() -> None:
    html = render.circuits_section(cfg(), live(), NOW)
    grid = html.split('id="node-grid"', 1)[1]
    assert "measured" in grid.split("</div>", 1)[0]
    assert re.search(r'data-phase="L1" data-load="14.00">.*?14.0 / 35 A', grid)
    garage = html.split('id="node-garage"', 1)[1]
    # no meter: the wallboxes below, each phase on its grid phase (b is 1-phase on L2)
    assert 'data-phase="L1" data-load="10.00"' in garage and "wallboxes only" in garage
    st = live()
    st.readings["gm"].ts = NOW - timedelta(seconds=60)  # silent for longer than meter_timeout_s
    html = render.circuits_section(cfg(), st, NOW)
    assert 'class="node warn" id="node-grid"' in html and "meter silent" in html


def test_a_silent_service_and_a_stale_wallbox_show_as_such() -> None:
    st = live()
    st.apply("service.health", {"service": "history"}, p.Health(service="history", status="online",
                                                                ts=NOW - timedelta(seconds=120)))
    html = render.health_section(cfg(), st, NOW, TZ)
    assert 'id="health-history" data-status="silent"' in html
    assert 'id="health-web" data-status="unknown"' in html  # configured, never heard: no report
    st.statuses["a"].ts = NOW - timedelta(minutes=5)
    card = render.evses_section(cfg(), st, NOW, TZ, render.Audience()).split('id="evse-a"', 1)[1]
    assert "last heard" in card.split("</article>", 1)[0]


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=40))
def test_everything_from_outside_is_escaped(text: str) -> None:
    hostile = f"<script>{text}</script>\"'><img src=x onerror=alert(1)>"
    c = cfg()
    c.evses[0].name = hostile
    st = live()
    st.limits["dso"].reason = hostile[:256]
    st.allocation.evses[0].detail = hostile  # type: ignore[union-attr]
    st.apply("link.smgw", {}, p.SmgwLinkStatus(state="down", error=hostile, ts=NOW))
    html = render.page(c, st, render.Record([], []), NOW, TZ, render.Audience(), "v")
    assert "<script>" not in html.replace('<script src="/static/app.js?v=v" defer></script>', "")
    assert "<img" not in html and "onerror=alert" not in html.replace("onerror=alert(1)&gt;", "")


def test_record_sections_hide_cards_from_anonymous_viewers() -> None:
    s = rec.SessionRow(id=1, evse_id="a", session_id="s1", session_ids=["s1"], source="evse-poller", id_tag="CARD-7",
                       started=NOW - timedelta(hours=2), stopped=NOW - timedelta(hours=1), energy_start_wh=0,
                       energy_stop_wh=11000, energy_wh=11000, peak_power_w=11000, phases=3, stop_reason=None)
    c = rec.ControlRow(id=1, kind="limit", source="dso", scope="controllable", started=NOW - timedelta(minutes=3),
                       ended=None, valid_until=NOW + timedelta(minutes=1), power_w=6000, current_a=None,
                       raised_to_floor=True, effective_w=8400, limit_id="x", answer="accepted", detail=None)
    r = render.Record([s], [c])
    logged = render.sessions_section(r, NOW, TZ, render.Audience(logged_in=True), "EUR")
    assert "CARD-7" in logged and "11.00" in logged and 'href="/export/sessions.csv"' in logged
    anon = render.sessions_section(r, NOW, TZ, render.Audience(), "EUR")
    assert "CARD-7" not in anon and "/export/" not in anon
    ctl = render.controls_section(r, NOW, TZ, render.Audience())
    assert "Grid operator" in ctl and "6.00 kW" in ctl and "ongoing" in ctl and "<td>yes</td>" in ctl


def test_series_json_marks_control_actions_within_the_window() -> None:
    start, end = render.window(NOW, 24)
    samples = [rec.NodeSample(NOW - timedelta(minutes=m), "grid", [10.0, 11.0, None], [35.0, 35.0, 35.0],
                              [1.0, 1.0, 1.0]) for m in (3, 2, 1)]
    old = rec.ControlRow(id=1, kind="limit", source="dso", scope=None, started=NOW - timedelta(days=2),
                         ended=NOW - timedelta(hours=20), valid_until=None, power_w=4200, current_a=None,
                         raised_to_floor=False, effective_w=None, limit_id=None, answer=None, detail=None)
    d = render.series_json(cfg(), "grid", samples, [old], start, end)
    assert d["fuse"] == [35.0, 35.0, 35.0] and len(d["points"]) == 3 and d["points"][0]["m"] == [10.0, 11.0, None]
    assert d["actions"] == [{"start": start.isoformat(), "end": (NOW - timedelta(hours=20)).isoformat(),
                             "label": "limit dso 4.2 kW"}]


def test_the_page_stays_small_for_a_large_installation() -> None:
    evses = "\n".join(f"  - {{id: e{i}, name: Wallbox number {i}, circuit: garage, modbus: {{profile: alfen-eve, "
                      f"host: 127.0.0.1}}}}" for i in range(40))
    text = CONFIG.split("evses:")[0] + "evses:\n" + evses + "\nmeters:" + CONFIG.split("meters:")[1]
    c = cfg(text)
    st = live()
    for i in range(40):
        st.apply("evse.status", {"evse_id": f"e{i}"}, p.EvseStatus(evse_id=f"e{i}", online=True, state="charging",
                                                                  current_a=[16.0, 16.0, 16.0], ts=NOW))
    rows = [rec.SessionRow(id=i, evse_id=f"e{i % 40}", session_id=str(i), session_ids=[str(i)], source=None,
                           id_tag="CARD", started=NOW - timedelta(hours=i), stopped=NOW, energy_start_wh=0,
                           energy_stop_wh=1, energy_wh=1000, peak_power_w=None, phases=3, stop_reason=None)
             for i in range(500)]
    html = render.page(c, st, render.Record(rows, []), NOW, TZ,
                       render.Audience(logged_in=True, can_set=True, user="anna", csrf="x" * 43), "v")
    total = len(html.encode()) + sum(len(b) for b in STATIC.values())
    assert total < 250_000, total
    print(f"page for 40 wallboxes: {len(html.encode())} B HTML + {sum(len(b) for b in STATIC.values())} B JS/CSS")


def test_accounts_roles_and_tokens() -> None:
    c = cfg()
    anna = check_password(c, "anna", "secret-a")
    assert anna is not None and anna.role == "admin" and anna.may("admin") and anna.logged_in
    ben = check_password(c, "ben", "secret-b")
    assert ben is not None and not ben.may("admin") and ben.may("viewer")
    assert check_password(c, "anna", "secret-b") is None and check_password(c, "nobody", "") is None
    tok = check_password(c, "installer", "tok-123")
    assert tok is not None and tok.role == "operator" and tok.method == "token"
    c.web.admin_tokens = False
    assert check_password(c, "installer", "tok-123") is None


def test_sessions_expire_and_are_bounded() -> None:
    s = Sessions(limit=3, ttl_s=100)
    anna = check_password(cfg(), "anna", "secret-a")
    assert anna is not None
    ids = [s.create(anna, now=float(i))[0] for i in range(4)]
    assert s.get(ids[0], now=5) is None and s.get(ids[3], now=5) is not None  # the oldest went first
    assert s.get(ids[3], now=104) is None  # expired
    sid, _ = s.create(anna, now=0)
    assert s.drop_unknown({"ben"}) >= 1 and s.get(sid, now=1) is None


def test_login_throttle_per_address() -> None:
    t = Throttle(limit=3, window_s=60)
    for i in range(3):
        assert t.blocked("10.0.0.9", now=float(i)) == 0
        t.failed("10.0.0.9", now=float(i))
    assert t.blocked("10.0.0.9", now=3) > 0 and t.blocked("10.0.0.8", now=3) == 0
    assert t.blocked("10.0.0.9", now=61) == 0  # the first failure left the window


def test_lan_rule_and_origin() -> None:
    c = cfg()
    assert on_lan(c, "192.168.1.20") and on_lan(c, "127.0.0.1") and on_lan(c, "::ffff:10.1.2.3")
    assert not on_lan(c, "8.8.8.8") and not on_lan(c, "not-an-ip") and not on_lan(c, None)
    assert same_origin(None, "h:8080", "http") and same_origin("http://h:8080", "h:8080", "http")
    assert not same_origin("http://evil.example", "h:8080", "http")
    assert not same_origin("http://h:8080", "h:8080", "https")


def test_example_configuration_has_the_web_and_home_assistant_sections() -> None:
    example = cfgmod.loads((Path(__file__).resolve().parents[2] / "config.example.yaml").read_text())
    assert example.web.view in ("login", "lan") and example.homeassistant.discovery_prefix == "homeassistant"
