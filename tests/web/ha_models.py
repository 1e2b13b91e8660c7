"""Home Assistant's MQTT discovery documents as pydantic models, written from Home Assistant's documentation
(integrations/mqtt "MQTT Discovery", sensor.mqtt, binary_sensor.mqtt, select.mqtt, number.mqtt and the sensor
integration's device classes with their units). Stricter than Home Assistant on one point: unknown keys are
errors here (Home Assistant ignores them; a typo would silently lose an option)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# sensor device classes and the units Home Assistant accepts for them (None: no unit)
SENSOR_UNITS: dict[str, set[str | None]] = {
    "apparent_power": {"VA"}, "aqi": {None}, "atmospheric_pressure": {"cbar", "bar", "hPa", "mmHg", "inHg", "kPa",
                                                                     "mbar", "Pa", "psi"},
    "battery": {"%"}, "carbon_dioxide": {"ppm"}, "carbon_monoxide": {"ppm"}, "current": {"A", "mA"},
    "data_rate": {"bit/s", "kbit/s", "Mbit/s", "Gbit/s", "B/s", "kB/s", "MB/s", "GB/s", "KiB/s", "MiB/s", "GiB/s"},
    "date": {None}, "distance": {"km", "m", "cm", "mm", "mi", "nmi", "yd", "in"},
    "duration": {"d", "h", "min", "s", "ms"},
    "energy": {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal", "kcal", "Mcal", "Gcal"},
    "energy_storage": {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal", "kcal", "Mcal", "Gcal"},
    "enum": {None}, "frequency": {"Hz", "kHz", "MHz", "GHz"}, "humidity": {"%"}, "illuminance": {"lx"},
    "monetary": set(),  # any ISO 4217 currency (checked below)
    "power_factor": {None, "%"}, "power": {"mW", "W", "kW", "MW", "GW", "TW"}, "reactive_power": {"var"},
    "signal_strength": {"dB", "dBm"}, "temperature": {"°C", "°F", "K"}, "timestamp": {None},
    "voltage": {"V", "mV", "µV", "kV", "MV"}, "volume": {"L", "mL", "gal", "fl. oz.", "m³", "ft³", "CCF"},
    "water": {"L", "gal", "m³", "ft³", "CCF"}, "weight": {"kg", "g", "mg", "µg", "oz", "lb", "st"},
}
BINARY_CLASSES = {"battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door",
                  "gas", "heat", "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug",
                  "power", "presence", "problem", "running", "safety", "smoke", "sound", "tamper", "update",
                  "vibration", "window"}
ID = r"^[A-Za-z0-9_-]+$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Device(Strict):
    identifiers: list[str] | str | None = None
    connections: list[list[str]] | None = None
    name: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    model_id: str | None = None
    hw_version: str | None = None
    sw_version: str | None = None
    serial_number: str | None = None
    suggested_area: str | None = None
    via_device: str | None = None
    configuration_url: str | None = None

    @model_validator(mode="after")
    def _identified(self) -> Device:
        if not self.identifiers and not self.connections:
            raise ValueError("at least one of identifiers or connections must be present to identify the device")
        return self


class Origin(Strict):
    name: str = Field(min_length=1)
    sw_version: str | None = None
    support_url: str | None = None


class Availability(Strict):
    topic: str = Field(min_length=1)
    payload_available: str = "online"
    payload_not_available: str = "offline"
    value_template: str | None = None


class Entity(Strict):
    name: str | None = None
    unique_id: str = Field(pattern=ID)  # optional for Home Assistant; the device registry needs it
    device: Device
    origin: Origin | None = None
    availability: list[Availability] | None = None
    availability_topic: str | None = None
    availability_mode: Literal["all", "any", "latest"] = "latest"
    availability_template: str | None = None
    payload_available: str | None = None
    payload_not_available: str | None = None
    enabled_by_default: bool = True
    encoding: str | None = None
    entity_category: Literal["config", "diagnostic"] | None = None
    entity_picture: str | None = None
    icon: str | None = None
    json_attributes_template: str | None = None
    json_attributes_topic: str | None = None
    object_id: str | None = None
    default_entity_id: str | None = None
    qos: Literal[0, 1, 2] = 0

    @model_validator(mode="after")
    def _availability(self) -> Entity:
        if self.availability is not None and self.availability_topic is not None:
            raise ValueError("availability must not be used together with availability_topic")
        return self


class Sensor(Entity):
    state_topic: str = Field(min_length=1)
    device_class: str | None = None
    state_class: Literal["measurement", "measurement_angle", "total", "total_increasing"] | None = None
    unit_of_measurement: str | None = None
    value_template: str | None = None
    options: list[str] | None = None
    suggested_display_precision: int | None = Field(default=None, ge=0)
    expire_after: int | None = Field(default=None, ge=0)
    force_update: bool = False
    last_reset_value_template: str | None = None

    @model_validator(mode="after")
    def _classes(self) -> Sensor:
        dc, unit = self.device_class, self.unit_of_measurement
        if dc is not None:
            if dc not in SENSOR_UNITS:
                raise ValueError(f"unknown sensor device_class {dc!r}")
            allowed = SENSOR_UNITS[dc]
            if dc == "monetary":
                if unit is None or len(unit) != 3 or not unit.isupper():
                    raise ValueError("a monetary sensor's unit is an ISO 4217 currency")
            elif unit not in allowed:
                raise ValueError(f"device_class {dc} takes units {sorted(map(str, allowed))}, not {unit!r}")
        if self.options is not None:
            if dc != "enum" or not self.options:
                raise ValueError("options need device_class enum and must not be empty")
            if self.state_class is not None or unit is not None:
                raise ValueError("options cannot be used together with state_class or unit_of_measurement")
        if dc == "enum" and not self.options:
            raise ValueError("an enum sensor lists its options")
        if dc in ("energy", "energy_storage", "water", "gas", "volume") and self.state_class == "measurement":
            raise ValueError(f"device_class {dc} cannot have state_class measurement (total or total_increasing)")
        if self.last_reset_value_template is not None and self.state_class != "total":
            raise ValueError("last_reset_value_template needs state_class total")
        if self.entity_category == "config":
            raise ValueError("a sensor's entity_category must be diagnostic")
        return self


class BinarySensor(Entity):
    state_topic: str = Field(min_length=1)
    device_class: str | None = None
    payload_on: str = "ON"
    payload_off: str = "OFF"
    value_template: str | None = None
    expire_after: int | None = Field(default=None, ge=0)
    force_update: bool = False
    off_delay: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _class(self) -> BinarySensor:
        if self.device_class is not None and self.device_class not in BINARY_CLASSES:
            raise ValueError(f"unknown binary_sensor device_class {self.device_class!r}")
        return self


class Select(Entity):
    command_topic: str = Field(min_length=1)
    options: list[str]
    state_topic: str | None = None
    value_template: str | None = None
    command_template: str | None = None
    optimistic: bool | None = None
    retain: bool = False


class Number(Entity):
    command_topic: str = Field(min_length=1)
    state_topic: str | None = None
    min: float = 1
    max: float = 100
    step: float = Field(default=1, ge=0.001)
    mode: Literal["auto", "box", "slider"] = "auto"
    device_class: str | None = None
    unit_of_measurement: str | None = None
    value_template: str | None = None
    command_template: str | None = None
    payload_reset: str = "None"
    optimistic: bool | None = None
    retain: bool = False

    @model_validator(mode="after")
    def _range(self) -> Number:
        if self.min >= self.max:
            raise ValueError("min must be below max")
        if self.device_class is not None and self.device_class in SENSOR_UNITS and \
                self.unit_of_measurement not in SENSOR_UNITS[self.device_class]:
            raise ValueError(f"device_class {self.device_class} takes units {SENSOR_UNITS[self.device_class]}")
        return self


MODELS: dict[str, type[Entity]] = {"sensor": Sensor, "binary_sensor": BinarySensor, "select": Select,
                                   "number": Number}
