"""Home Assistant MQTT discovery, published by the web service, against the real Mosquitto with the project's
ACL: every document valid by models written from Home Assistant's documentation; the templates read what
chargegate publishes (rendered with Jinja2, Home Assistant's template engine); retained on the broker for the
household's account that Home Assistant logs in with, published again when Home Assistant announces itself;
a round trip through the select (charging mode) and the number (maximum current) into the history service
and back on the state topic; an empty retained document for a wallbox taken out of the configuration, also
across a restart; and what the ACL refuses."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jinja2
import paho.mqtt.client as mqtt
import pytest
from ha_models import MODELS, Number, Select, Sensor
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError
from web_support import CONFIG, Running, ha_broker, start_history, start_web, until, write_config

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import LocalBroker, account_password, free_port
from chargegate.topics import SERVICES
from conftest import BrokerHandle
from web.ha import Discovery

JINJA = jinja2.Environment(autoescape=False)


def render(template: str, payload: bytes | str) -> str:
    """A ``value_template`` as Home Assistant renders it: ``value`` the payload, ``value_json`` its JSON."""
    text = payload.decode() if isinstance(payload, bytes) else payload
    try:
        value_json = json.loads(text)
    except ValueError:
        value_json = None
    return JINJA.from_string(template).render(value=text, value_json=value_json).strip()


def command(template: str, value: Any) -> str:
    return JINJA.from_string(template).render(value=value)


class Mqtt:
    """An MQTT client that keeps every message (topic, payload, retained) - here: Home Assistant."""

    def __init__(self, port: int, user: str, password: str, subs: tuple[str, ...]) -> None:
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ha-{time.monotonic_ns()}")
        self.c.username_pw_set(user, password)

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, pr: Any) -> None:
            for s in subs:
                c.subscribe(s, qos=1)
            self.ready.set()

        self.c.on_connect = on_connect
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(5)

    def _on(self, c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.msgs.append((m.topic, bytes(m.payload), bool(m.retain)))

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def latest(self, topic: str) -> bytes | None:
        with self.lock:
            for t, pl, _ in reversed(self.msgs):
                if t == topic:
                    return pl
        return None

    def count(self, topic: str) -> int:
        with self.lock:
            return sum(1 for t, _, _ in self.msgs if t == topic)

    def topics(self, prefix: str, nonempty: bool = True) -> set[str]:
        """Topics whose latest message is a document (not empty)."""
        latest: dict[str, bytes] = {}
        with self.lock:
            for t, pl, _ in self.msgs:
                if t.startswith(prefix):
                    latest[t] = pl
        return {t for t, pl in latest.items() if bool(pl) == nonempty}

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@dataclass
class Rig:
    broker: LocalBroker
    handle: BrokerHandle
    path: Path
    history: Running
    web: Running
    ha: Mqtt

    def config(self) -> cfgmod.Config:
        return cfgmod.load(self.path)


@pytest.fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("ha")
    broker, handle = ha_broker(tmp)
    path = write_config(tmp, handle.port, free_port())
    cfg = cfgmod.load(path)
    ha = Mqtt(handle.port, "user", account_password(cfg, "user"), ("homeassistant/#", "chargegate/#"))
    history = await start_history(path)
    web = await start_web(path)
    r = Rig(broker, handle, path, history, web, ha)
    try:
        yield r
    finally:
        ha.close()
        await r.web.stop()
        await history.stop()
        broker.discard()


def fresh_retained(rig: Rig, prefix: str = "homeassistant/", wait: float = 1.0) -> dict[str, bytes]:
    """What a client connecting now gets retained under ``prefix`` (Home Assistant after a restart)."""
    m = Mqtt(rig.handle.port, "user", account_password(rig.config(), "user"), (prefix + "#",))
    try:
        time.sleep(wait)
        return {t: pl for t, pl, retained in list(m.msgs) if retained and pl}
    finally:
        m.close()


def test_every_document_is_valid_by_home_assistants_rules() -> None:
    cfg = cfgmod.loads(CONFIG.format(state="/tmp/x", broker=1883, web=8080))
    docs = Discovery(cfg).documents()
    uids = set()
    for topic, doc in docs.items():
        m = re.fullmatch(r"homeassistant/(sensor|binary_sensor|select|number)/chargegate/([A-Za-z0-9_-]+)/config",
                         topic)
        assert m, topic
        model = MODELS[m.group(1)].model_validate(doc)
        assert model.unique_id == m.group(2) and model.unique_id not in uids
        uids.add(model.unique_id)
        assert model.origin is not None and model.origin.name == "chargegate"
        assert model.availability and model.availability_mode == "all"
        for a in model.availability:
            assert re.fullmatch(r"chargegate/service/([a-z-]+)/health", a.topic).group(1) in SERVICES  # type: ignore[union-attr]
    devices = {tuple(d["device"]["identifiers"]) for d in docs.values()}
    assert devices == {("chargegate_site",), ("chargegate_evse_w1",), ("chargegate_evse_w2",), ("chargegate_meter_gm",)}
    by_uid = {d["unique_id"]: d for d in docs.values()}
    energy = by_uid["chargegate_evse_w1_energy"]
    assert (energy["device_class"], energy["state_class"], energy["unit_of_measurement"]) == \
        ("energy", "total_increasing", "kWh")  # what the Energy dashboard takes
    imp = by_uid["chargegate_meter_gm_import"]
    assert (imp["state_class"], imp["unit_of_measurement"]) == ("total_increasing", "kWh")
    power = by_uid["chargegate_evse_w1_power"]
    assert (power["device_class"], power["state_class"], power["unit_of_measurement"]) == ("power", "measurement", "W")
    assert {k for k in by_uid if k.startswith("chargegate_evse_w2_current")} == {"chargegate_evse_w2_current_l1"}
    sel = Select.model_validate(by_uid["chargegate_evse_w1_mode"])
    assert sel.options == ["off", "now", "rules", "solar", "solar+min"]
    assert sel.command_topic == "chargegate/evse/w1/mode/set" and sel.state_topic == "chargegate/evse/w1/mode"
    num = Number.model_validate(by_uid["chargegate_evse_w1_max_current"])
    assert (num.min, num.max, num.unit_of_measurement) == (6.0, 16.0, "A")
    assert by_uid["chargegate_site_limit_dso_active"]["state_topic"] == "chargegate/grid/limit/dso"
    # the models do refuse what Home Assistant refuses (so this test can fail)
    bad = dict(energy, state_class="measurement")
    with pytest.raises(ValidationError, match="cannot have state_class measurement"):
        Sensor.model_validate(bad)
    with pytest.raises(ValidationError, match="takes units"):
        Sensor.model_validate(dict(power, unit_of_measurement="A"))
    with pytest.raises(ValidationError, match="Extra inputs"):
        Sensor.model_validate(dict(power, stat_class="measurement"))
    with pytest.raises(ValidationError, match="identifiers or connections"):
        Sensor.model_validate(dict(power, device={"name": "x"}))


def test_templates_read_what_chargegate_publishes() -> None:
    cfg = cfgmod.loads(CONFIG.format(state="/tmp/x", broker=1883, web=8080))
    by = {d["unique_id"].removeprefix("chargegate_"): d for d in Discovery(cfg).documents().values()}
    now = p.utcnow()
    st = p.EvseStatus(evse_id="w1", online=True, state="charging", current_a=[9.5, 9.0, 9.25], power_w=6400.0,
                      energy_wh=12345.0, session=p.Session(id="s", started=now, energy_wh=2500.0)).to_json()
    assert render(by["evse_w1_state"]["value_template"], st) == "charging"
    assert render(by["evse_w1_plugged"]["value_template"], st) == "ON"
    assert render(by["evse_w1_power"]["value_template"], st) == "6400.0"
    assert render(by["evse_w1_energy"]["value_template"], st) == "12.345"
    assert render(by["evse_w1_current_l3"]["value_template"], st) == "9.25"
    assert render(by["evse_w1_session_energy"]["value_template"], st) == "2.5"
    off = p.EvseStatus(evse_id="w1", online=False, state="charging", reason="timeout").to_json()
    assert render(by["evse_w1_state"]["value_template"], off) == "offline"
    assert render(by["evse_w1_plugged"]["value_template"], off) == "OFF"
    assert render(by["evse_w1_energy"]["value_template"], off) == "None"  # unknown, not 0
    alloc = p.Allocation(cycle=1, evses=[
        p.EvseAllocation(evse_id="w2", current_a=6.0, phases=1, bound_by="evse_max"),
        p.EvseAllocation(evse_id="w1", current_a=8.5, phases=3, bound_by="§14a_floor", detail="dso raised")],
        limits={"floor_14a_w": 8400.0, "grid_limits": [{"source": "dso", "raised_to_floor": True}]}).to_json()
    assert render(by["evse_w1_granted"]["value_template"], alloc) == "8.5"
    assert render(by["evse_w1_reason"]["value_template"], alloc) == "dso raised"
    assert render(by["evse_w2_reason"]["value_template"], alloc) == "evse_max"
    assert render(by["site_floor_14a"]["value_template"], alloc) == "8400.0"
    assert render(by["site_floor_14a_applies"]["value_template"], alloc) == "ON"
    none = p.Allocation(cycle=1, limits={"floor_14a_w": 4200.0, "grid_limits": []}).to_json()
    assert render(by["evse_w1_granted"]["value_template"], none) == "None"
    assert render(by["site_floor_14a_applies"]["value_template"], none) == "OFF"
    lim = p.GridLimit(source="dso", active=True, power_w=6000.0, valid_until=now + timedelta(minutes=2)).to_json()
    assert render(by["site_limit_dso"]["value_template"], lim) == "6000.0"
    assert render(by["site_limit_dso_active"]["value_template"], lim) == "ON"
    ended = p.GridLimit(source="dso", active=False, valid_until=now).to_json()
    assert render(by["site_limit_dso"]["value_template"], ended) == "None"
    assert render(by["site_limit_dso_active"]["value_template"], ended) == "OFF"
    link = p.SmgwLinkStatus(state="up", cert_days_left=364.62).to_json()
    assert render(by["site_smgw_link"]["value_template"], link) == "ON"
    assert render(by["site_smgw_link_state"]["value_template"], link) == "up"
    assert render(by["site_smgw_cert_days"]["value_template"], link) == "364.6"
    tariff = p.TariffCurrent(period=p.TariffPeriod(id="t", level="low", start=now)).to_json()
    assert render(by["site_tariff"]["value_template"], tariff) == "low"
    reading = p.MeterReading(meter_id="gm", current_a=[1.0, 2.0, 3.0], power_w=-1200.0, energy_import_wh=5.5e6,
                             energy_export_wh=None).to_json()
    assert render(by["meter_gm_import"]["value_template"], reading) == "5500.0"
    assert render(by["meter_gm_export"]["value_template"], reading) == "None"
    assert render(by["meter_gm_power"]["value_template"], reading) == "-1200.0"
    # availability: offline (the last will) is unavailable; degraded still serves its topics
    tpl = by["evse_w1_state"]["availability"][0]["value_template"]
    for status, shown in (("online", "online"), ("degraded", "online"), ("offline", "offline")):
        assert render(tpl, p.Health(service="evse-poller", status=status).to_json()) == shown


async def test_retained_for_home_assistant_and_published_again_when_it_comes_online(rig: Rig) -> None:
    docs = Discovery(rig.config()).documents()
    await until("every document at Home Assistant", lambda: set(docs) <= rig.ha.topics("homeassistant/"))
    for topic, doc in docs.items():
        assert json.loads(rig.ha.latest(topic) or b"") == doc
    got = fresh_retained(rig)
    assert set(got) == set(docs)  # retained: a Home Assistant that starts later finds them
    before = rig.ha.count(next(iter(docs)))
    published = rig.web.ctx.counters["ha_discovery_published"]
    rig.ha.publish("homeassistant/status", "online")  # Home Assistant's birth message
    await until("published again", lambda: rig.ha.count(next(iter(docs))) > before)
    assert rig.web.ctx.counters["ha_discovery_published"] == published + 1
    rig.ha.publish("homeassistant/status", "offline")
    rig.ha.publish("homeassistant/status", "{bogus")
    await until("a bad status counted", lambda: rig.web.ctx.counters["ha_status_invalid"] == 1)
    assert rig.web.ctx.counters["ha_discovery_published"] == published + 1


async def test_select_and_number_round_trip_through_the_history_service(rig: Rig) -> None:
    by = {d["unique_id"]: d for d in Discovery(rig.config()).documents().values()}
    sel, num = by["chargegate_evse_w1_mode"], by["chargegate_evse_w1_max_current"]
    # the user picks "now" in Home Assistant: it renders the command template and publishes it
    rig.ha.publish(sel["command_topic"], command(sel["command_template"], "now"))

    def state_of(doc: dict[str, Any]) -> str | None:
        pl = rig.ha.latest(doc["state_topic"])
        return render(doc["value_template"], pl) if pl else None

    await until("the select's state follows", lambda: state_of(sel) == "now")
    mode = json.loads(rig.ha.latest(sel["state_topic"]) or b"")
    assert mode["set_by"] == "homeassistant"
    assert state_of(num) == "16"  # no cap set: the wallbox's maximum
    rig.ha.publish(num["command_topic"], command(num["command_template"], 10.0))
    await until("the number's state follows", lambda: state_of(num) == "10.0")
    assert state_of(sel) == "now"  # the cap left the mode as it was
    # outside the wallbox's range: refused by the history service, the state stays
    rig.ha.publish(num["command_topic"], command(num["command_template"], 40.0))
    await until("refused", lambda: rig.history.ctx.counters["mode_invalid"] == 1)
    assert state_of(num) == "10.0"


async def test_a_wallbox_taken_out_of_the_configuration_gets_an_empty_document(rig: Rig) -> None:
    docs = Discovery(rig.config()).documents()
    w2 = {t for t in docs if "_evse_w2_" in t}
    assert len(w2) >= 8
    text = rig.path.read_text()
    rig.path.write_text(text.replace("  - {id: w2, circuit: garage, phases: 1, phase_rotation: [2], "
                                     "ocpp: {charge_box_id: CB2}}\n", ""))
    assert "w2" not in rig.path.read_text()
    assert await rig.web.ctx.reload()
    await until("an empty retained document for each of w2's entities",
                lambda: w2 <= rig.ha.topics("homeassistant/", nonempty=False))
    left = fresh_retained(rig)
    assert not (set(left) & w2) and {t for t in docs if "_evse_w1_" in t} <= set(left)
    assert rig.web.ctx.counters["ha_discovery_removed"] >= len(w2)


async def test_documents_of_an_earlier_configuration_are_cleared_at_start(rig: Rig) -> None:
    gm = {t for t in Discovery(rig.config()).documents() if "_meter_gm_" in t}
    assert gm <= set(fresh_retained(rig))
    await rig.web.stop()
    text = rig.path.read_text().replace("    meter: gm\n", "")
    rig.path.write_text(text.split("meters:")[0] + text.split("meters:")[1].split("\n", 2)[2])
    assert not rig.config().meters
    rig.web = await start_web(rig.path)  # it finds the meter's retained documents and clears them
    await until("the meter's documents cleared", lambda: gm <= rig.ha.topics("homeassistant/", nonempty=False))
    assert not (set(fresh_retained(rig)) & gm)


def test_the_acl_lets_home_assistant_announce_itself_but_not_write_discovery(rig: Rig) -> None:
    cfg = rig.config()
    probe = f"probe-{time.monotonic_ns()}".encode()
    for account, topic in (("user", "homeassistant/sensor/chargegate/evil/config"),
                           ("web", "homeassistant/sensor/other-node/x/config"),
                           ("user", "chargegate/service/web/health")):
        c = Mqtt(rig.handle.port, account, account_password(cfg, account), ())
        try:
            c.publish(topic, probe)
            fence = f"fence-{time.monotonic_ns()}".encode()
            rig.ha.publish("homeassistant/status", fence)  # allowed; arrives after the probe would have
            deadline = time.monotonic() + 5
            while rig.ha.latest("homeassistant/status") != fence and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rig.ha.latest("homeassistant/status") == fence
            assert rig.ha.latest(topic) != probe, (account, topic)
        finally:
            c.close()
