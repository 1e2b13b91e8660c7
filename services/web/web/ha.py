"""Home Assistant MQTT discovery documents for the installation (pure: configuration in, documents out).

One device per wallbox, per meter and one for the site, each entity with a ``unique_id`` (prefixed with the
node id, ``homeassistant.node_id``, default the topic root) and the device's ``identifiers``. The entities
read the topics chargegate already publishes (JSON, picked apart with ``value_template``); availability
comes from the health topics of the services that write them (all of them must be up). Two entities write:
the charging mode (``select``) and the maximum current (``number``) of a wallbox, both through
``<root>/evse/<id>/mode/set`` - the household's command topic, which Home Assistant's account (``user``)
may write. Single-component discovery: ``<prefix>/<component>/<node_id>/<object_id>/config``, retained.
"""

from __future__ import annotations

import json
import re
from typing import Any

from chargegate import __version__
from chargegate import payloads as p
from chargegate.config import Config, Evse, Meter

COMPONENTS = ("sensor", "binary_sensor", "select", "number")
_SAFE = re.compile(r"[^A-Za-z0-9_-]")

# the health value: degraded still serves its topics; offline (the last will) is unavailable
AVAILABLE_TPL = "{{ 'offline' if value_json.status == 'offline' else 'online' }}"


def safe(text: str) -> str:
    """An id for a discovery topic and a unique_id: ``[A-Za-z0-9_-]`` only."""
    return _SAFE.sub("_", text)


class Discovery:
    """The discovery documents of one configuration."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.site.topic_root
        self.prefix = config.homeassistant.discovery_prefix
        self.node = config.homeassistant.node(self.root)
        self.origin = {"name": "chargegate", "sw_version": __version__}
        self.site_device_id = f"{self.node}_site"

    # -- topics -------------------------------------------------------------------------------------------
    def t(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def health(self, service: str) -> str:
        return self.t(f"service/{service}/health")

    def config_topic(self, component: str, object_id: str) -> str:
        return f"{self.prefix}/{component}/{self.node}/{object_id}/config"

    @property
    def own_filter(self) -> str:
        """Every discovery topic this installation may have published (to find stale ones)."""
        return f"{self.prefix}/+/{self.node}/+/config"

    def is_own(self, topic: str) -> bool:
        parts = topic.split("/")
        pre = self.prefix.split("/")
        return (len(parts) == len(pre) + 4 and parts[:len(pre)] == pre and parts[len(pre)] in COMPONENTS
                and parts[len(pre) + 1] == self.node and parts[-1] == "config")

    # -- devices -------------------------------------------------------------------------------------------
    def site_device(self) -> dict[str, Any]:
        return {"identifiers": [self.site_device_id], "name": self.config.site.name, "manufacturer": "chargegate",
                "model": "EV charging manager", "sw_version": __version__}

    def evse_device(self, e: Evse) -> dict[str, Any]:
        model = e.modbus.profile if e.modbus is not None else f"OCPP charge point {e.ocpp.charge_box_id}"  # type: ignore[union-attr]
        return {"identifiers": [f"{self.node}_evse_{safe(e.id)}"], "name": e.name or e.id, "model": model,
                "via_device": self.site_device_id}

    def meter_device(self, m: Meter) -> dict[str, Any]:
        return {"identifiers": [f"{self.node}_meter_{safe(m.id)}"], "name": m.name or m.id,
                "model": m.modbus.profile, "via_device": self.site_device_id}

    def availability(self, *services: str) -> dict[str, Any]:
        return {"availability": [{"topic": self.health(s), "value_template": AVAILABLE_TPL} for s in services],
                "availability_mode": "all"}

    def _doc(self, component: str, key: str, name: str, device: dict[str, Any], services: tuple[str, ...],
             **fields: Any) -> tuple[str, dict[str, Any]]:
        uid = f"{self.node}_{key}"
        doc = {"name": name, "unique_id": uid, "device": device, "origin": self.origin,
               **self.availability(*services), **fields}
        return self.config_topic(component, uid), doc

    # -- entities ------------------------------------------------------------------------------------------
    def evse_docs(self, e: Evse) -> list[tuple[str, dict[str, Any]]]:
        dev = self.evse_device(e)
        sid = safe(e.id)
        driver = "evse-poller" if e.modbus is not None else "ocpp-gateway"
        status = self.t(f"evse/{e.id}/status")
        alloc = self.t("controller/allocation")
        mode = self.t(f"evse/{e.id}/mode")
        pick = (f"{{% set a = value_json.evses | selectattr('evse_id', 'equalto', {json.dumps(e.id)}) | list %}}")
        docs = [
            self._doc("sensor", f"evse_{sid}_state", "State", dev, (driver,), state_topic=status,
                      device_class="enum", options=[s.value for s in p.EvseState],
                      value_template="{{ value_json.state if value_json.online else 'offline' }}"),
            self._doc("binary_sensor", f"evse_{sid}_plugged", "Car plugged in", dev, (driver,), state_topic=status,
                      device_class="plug", payload_on="ON", payload_off="OFF",
                      value_template="{{ 'ON' if value_json.online and value_json.state in "
                                     "['preparing', 'charging', 'suspended', 'finishing'] else 'OFF' }}"),
            self._doc("sensor", f"evse_{sid}_power", "Power", dev, (driver,), state_topic=status,
                      device_class="power", state_class="measurement", unit_of_measurement="W",
                      value_template="{{ value_json.power_w if value_json.power_w is number else 'None' }}"),
            self._doc("sensor", f"evse_{sid}_energy", "Energy", dev, (driver,), state_topic=status,
                      device_class="energy", state_class="total_increasing", unit_of_measurement="kWh",
                      suggested_display_precision=2,
                      value_template="{{ (value_json.energy_wh / 1000) | round(3) if value_json.energy_wh is number "
                                     "else 'None' }}"),
        ]
        for i in range(e.phases):
            docs.append(self._doc("sensor", f"evse_{sid}_current_l{i + 1}", f"Current L{i + 1}", dev, (driver,),
                                  state_topic=status, device_class="current", state_class="measurement",
                                  unit_of_measurement="A", suggested_display_precision=1,
                                  value_template=f"{{{{ value_json.current_a[{i}] }}}}"))
        docs += [
            self._doc("sensor", f"evse_{sid}_granted", "Granted current", dev, ("load-controller",),
                      state_topic=alloc, device_class="current", state_class="measurement", unit_of_measurement="A",
                      suggested_display_precision=1,
                      value_template=pick + "{{ a[0].current_a if a else 'None' }}"),
            self._doc("sensor", f"evse_{sid}_reason", "Reason", dev, ("load-controller",), state_topic=alloc,
                      value_template=pick + "{{ ((a[0].detail or a[0].bound_by) | truncate(250, true)) if a "
                                            "else 'None' }}"),
            self._doc("sensor", f"evse_{sid}_session_energy", "Session energy", dev, (driver,), state_topic=status,
                      device_class="energy", unit_of_measurement="kWh", suggested_display_precision=2,
                      value_template="{{ (value_json.session.energy_wh / 1000) | round(3) if value_json.session "
                                     "else 0 }}"),
            self._doc("select", f"evse_{sid}_mode", "Charging mode", dev, ("history",), state_topic=mode,
                      command_topic=self.t(f"evse/{e.id}/mode/set"), options=[m.value for m in p.ChargingModeName],
                      value_template="{{ value_json.mode }}",
                      command_template=_command(e.id, '"mode": "{{ value }}"'), qos=1, retain=False),
            self._doc("number", f"evse_{sid}_max_current", "Maximum current", dev, ("history",), state_topic=mode,
                      command_topic=self.t(f"evse/{e.id}/mode/set"), min=e.min_current_a, max=e.max_current_a,
                      step=1, mode="slider", device_class="current", unit_of_measurement="A",
                      value_template=f"{{{{ value_json.max_current_a if value_json.max_current_a is number "
                                     f"else {e.max_current_a:g} }}}}",
                      command_template=_command(e.id, '"max_current_a": {{ value | float }}'), qos=1, retain=False),
        ]
        return docs

    def meter_docs(self, m: Meter) -> list[tuple[str, dict[str, Any]]]:
        dev = self.meter_device(m)
        sid = safe(m.id)
        topic = self.t(f"meter/{m.id}/reading")
        svc = ("evse-poller",)
        docs = [
            self._doc("sensor", f"meter_{sid}_power", "Power", dev, svc, state_topic=topic, device_class="power",
                      state_class="measurement", unit_of_measurement="W",
                      value_template="{{ value_json.power_w if value_json.power_w is number else 'None' }}"),
            self._doc("sensor", f"meter_{sid}_import", "Energy imported", dev, svc, state_topic=topic,
                      device_class="energy", state_class="total_increasing", unit_of_measurement="kWh",
                      suggested_display_precision=2,
                      value_template="{{ (value_json.energy_import_wh / 1000) | round(3) if "
                                     "value_json.energy_import_wh is number else 'None' }}"),
            self._doc("sensor", f"meter_{sid}_export", "Energy exported", dev, svc, state_topic=topic,
                      device_class="energy", state_class="total_increasing", unit_of_measurement="kWh",
                      suggested_display_precision=2,
                      value_template="{{ (value_json.energy_export_wh / 1000) | round(3) if "
                                     "value_json.energy_export_wh is number else 'None' }}"),
        ]
        for i in range(3):
            docs.append(self._doc("sensor", f"meter_{sid}_current_l{i + 1}", f"Current L{i + 1}", dev, svc,
                                  state_topic=topic, device_class="current", state_class="measurement",
                                  unit_of_measurement="A", suggested_display_precision=1,
                                  value_template=f"{{{{ value_json.current_a[{i}] if value_json.current_a "
                                                 f"else 'None' }}}}"))
        return docs

    def site_docs(self) -> list[tuple[str, dict[str, Any]]]:
        dev = self.site_device()
        docs = []
        for source, label in (("dso", "Grid operator limit"), ("supplier", "Supplier limit")):
            topic = self.t(f"grid/limit/{source}")
            docs += [
                self._doc("sensor", f"site_limit_{source}", label, dev, ("smgw-link",), state_topic=topic,
                          device_class="power", state_class="measurement", unit_of_measurement="W",
                          value_template="{{ value_json.power_w if value_json.active and value_json.power_w is "
                                         "number else 'None' }}"),
                self._doc("binary_sensor", f"site_limit_{source}_active", f"{label} active", dev, ("smgw-link",),
                          state_topic=topic, payload_on="ON", payload_off="OFF",
                          value_template="{{ 'ON' if value_json.active else 'OFF' }}"),
            ]
        alloc = self.t("controller/allocation")
        link = self.t("link/smgw")
        docs += [
            self._doc("sensor", "site_floor_14a", "§14a minimum", dev, ("load-controller",), state_topic=alloc,
                      device_class="power", state_class="measurement", unit_of_measurement="W",
                      value_template="{{ value_json.limits.floor_14a_w if value_json.limits.floor_14a_w is number "
                                     "else 'None' }}"),
            self._doc("binary_sensor", "site_floor_14a_applies", "Limit raised to the §14a minimum", dev,
                      ("load-controller",), state_topic=alloc, payload_on="ON", payload_off="OFF",
                      value_template="{{ 'ON' if (value_json.limits.grid_limits | default([]) | "
                                     "selectattr('raised_to_floor') | list) else 'OFF' }}"),
            self._doc("binary_sensor", "site_smgw_link", "SMGW link", dev, ("smgw-link",), state_topic=link,
                      device_class="connectivity", payload_on="ON", payload_off="OFF",
                      value_template="{{ 'ON' if value_json.state == 'up' else 'OFF' }}"),
            self._doc("sensor", "site_smgw_link_state", "SMGW link state", dev, ("smgw-link",), state_topic=link,
                      device_class="enum", options=[s.value for s in p.LinkState],
                      value_template="{{ value_json.state }}"),
            self._doc("sensor", "site_smgw_cert_days", "SMGW certificate days left", dev, ("smgw-link",),
                      state_topic=link, device_class="duration", state_class="measurement", unit_of_measurement="d",
                      entity_category="diagnostic",
                      value_template="{{ value_json.cert_days_left | round(1) if value_json.cert_days_left is number "
                                     "else 'None' }}"),
            self._doc("sensor", "site_tariff", "Tariff", dev, ("smgw-link",), state_topic=self.t("tariff/current"),
                      device_class="enum", options=[t.value for t in p.TariffLevel],
                      value_template="{{ value_json.period.level }}"),
        ]
        return docs

    def documents(self) -> dict[str, dict[str, Any]]:
        """Discovery topic -> document, for the whole configuration."""
        out: dict[str, dict[str, Any]] = {}
        for topic, doc in self.site_docs():
            out[topic] = doc
        for e in self.config.evses:
            for topic, doc in self.evse_docs(e):
                out[topic] = doc
        for m in self.config.meters:
            for topic, doc in self.meter_docs(m):
                out[topic] = doc
        return out


def _command(evse_id: str, field: str) -> str:
    return f'{{"evse_id": {json.dumps(evse_id)}, {field}, "source": "homeassistant"}}'


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
