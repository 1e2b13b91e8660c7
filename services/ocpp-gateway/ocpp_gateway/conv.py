"""Conversions between OCPP 1.6, OCPP 2.0.1 and the bus payloads.

Meter values travel inside the gateway as :class:`Sample` lists (values kept as the decimal
strings the wallbox sent, so nothing is rounded on the way); they are written out in the format
of the receiving side. Each value keeps the sampled value exactly as the wallbox sent it: towards a
backend of the same OCPP version that is what goes out, byte for byte (signed meter data included:
1.6 ``format: "SignedData"``, 2.0.1 ``signedMeterValue``). Only across versions is a value rebuilt;
signed data then travels in the other version's form (see :func:`to_16` and :func:`to_201`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from chargegate import payloads as p
from ocpp_gateway.ocpp_enums import e16, e201

ENERGY = "Energy.Active.Import.Register"
POWER = "Power.Active.Import"
CURRENT = "Current.Import"
_SCALE = {"Wh": Decimal(1), "kWh": Decimal(1000), "W": Decimal(1), "kW": Decimal(1000), "A": Decimal(1)}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def num_str(x: float | int | Decimal | str) -> str:
    """A number as OCPP 1.6 writes it: no exponent, no trailing ``.0``."""
    d = Decimal(str(x))
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def to_number(s: str) -> int | float:
    d = Decimal(s)
    return int(d) if d == d.to_integral_value() else float(d)


@dataclass
class Value:
    value: str
    measurand: str = ENERGY
    unit: str | None = None
    phase: str | None = None
    context: str | None = None
    location: str | None = None
    format: str | None = None  # 1.6: "Raw" or "SignedData" (then ``value`` is the signed data, e.g. OCMF)
    signed: dict[str, Any] | None = None  # 2.0.1: signedMeterValue as sent
    raw: dict[str, Any] | None = None  # the sampled value exactly as the wallbox sent it ...
    raw_version: str | None = None  # ... in this OCPP version ("1.6", "2.0.1")

    @property
    def is_signed(self) -> bool:
        return self.format == "SignedData" or self.signed is not None

    def signed_data(self) -> tuple[str, str | None] | None:
        """(data, encoding) of signed meter data on this value, None when there is none."""
        if self.format == "SignedData":
            return self.value, "OCMF" if self.value.startswith("OCMF|") else None
        if self.signed is not None and isinstance(self.signed.get("signedMeterData"), str):
            return self.signed["signedMeterData"], self.signed.get("encodingMethod")
        return None

    def scaled(self) -> Decimal | None:
        """The value in Wh / W / A (kWh and kW scaled), None when it is not a number."""
        try:
            d = Decimal(self.value)
        except InvalidOperation:
            return None
        if not d.is_finite() or self.format == "SignedData":
            return None
        unit = self.unit or ("Wh" if self.measurand.startswith("Energy") else
                             "W" if self.measurand.startswith("Power") else "A")
        return d * _SCALE.get(unit, Decimal(1))


@dataclass
class Sample:
    timestamp: str
    values: list[Value] = field(default_factory=list)


def from_16(meter_value: list[dict[str, Any]]) -> list[Sample]:
    out = []
    for mv in meter_value:
        vals = [Value(value=str(sv["value"]), measurand=sv.get("measurand", ENERGY), unit=sv.get("unit"),
                      phase=sv.get("phase"), context=sv.get("context"), location=sv.get("location"),
                      format=sv.get("format"), raw=sv, raw_version="1.6")
                for sv in mv.get("sampledValue", [])]
        out.append(Sample(mv["timestamp"], vals))
    return out


def from_201(meter_value: list[dict[str, Any]]) -> list[Sample]:
    out = []
    for mv in meter_value:
        vals = []
        for sv in mv.get("sampledValue", []):
            unit = (sv.get("unitOfMeasure") or {}).get("unit")
            mult = (sv.get("unitOfMeasure") or {}).get("multiplier", 0)
            vals.append(Value(value=_scaled_201(sv["value"], mult), measurand=sv.get("measurand", ENERGY), unit=unit,
                              phase=sv.get("phase"), context=sv.get("context"), location=sv.get("location"),
                              signed=sv.get("signedMeterValue"), raw=sv, raw_version="2.0.1"))
        out.append(Sample(mv["timestamp"], vals))
    return out


MAX_MULTIPLIER = 24  # a 2.0.1 unitOfMeasure.multiplier beyond +-24 is no measurement (the schema has no bound)


def _scaled_201(value: Any, mult: Any) -> str:
    """``value * 10**multiplier`` as a decimal string; "NaN" (not a number: no reading) when the multiplier is
    out of range. The sampled value itself still goes to a 2.0.1 backend exactly as sent."""
    try:
        m = int(mult)
        if abs(m) > MAX_MULTIPLIER:
            return "NaN"
        return num_str(Decimal(str(value)) * (Decimal(10) ** m))
    except (ArithmeticError, ValueError, TypeError):
        return "NaN"


MEASURANDS_16 = frozenset(x.value for x in e16.Measurand)
UNITS_16 = frozenset(x.value for x in e16.UnitOfMeasure)
PHASES_16 = frozenset(x.value for x in e16.Phase)
LOCATIONS_16 = frozenset(x.value for x in e16.Location)
CONTEXTS_16 = frozenset(x.value for x in e16.ReadingContext)
MEASURANDS_201 = frozenset(x.value for x in e201.MeasurandEnumType)
PHASES_201 = frozenset(x.value for x in e201.PhaseEnumType)
LOCATIONS_201 = frozenset(x.value for x in e201.LocationEnumType)
CONTEXTS_201 = frozenset(x.value for x in e201.ReadingContextEnumType)


def to_16(samples: list[Sample], context: str | None = None) -> list[dict[str, Any]]:
    """1.6 meterValue list. A value a 1.6 wallbox sent goes out as it was sent (``context`` is not
    filled in either). A 2.0.1 value is rebuilt; values 1.6 cannot express (a 2.0.1-only measurand or
    unit) are left out; its signedMeterValue follows it as a sampled value of its own with ``format:
    SignedData`` and the signed data as ``value`` (as 1.6 Eichrecht wallboxes send them)."""
    out = []
    for s in samples:
        svs = []
        for v in s.values:
            if v.raw is not None and v.raw_version == "1.6":
                svs.append(dict(v.raw))
                continue
            if v.value == "NaN":  # a 2.0.1 value with a multiplier out of range: no reading
                continue
            if v.measurand not in MEASURANDS_16 or (v.unit is not None and v.unit not in UNITS_16) \
                    or (v.phase is not None and v.phase not in PHASES_16):
                continue
            sv: dict[str, Any] = {"value": v.value, "measurand": v.measurand}
            ctx = v.context if v.context in CONTEXTS_16 else context
            if ctx:
                sv["context"] = ctx
            if v.unit:
                sv["unit"] = v.unit
            if v.phase:
                sv["phase"] = v.phase
            if v.location in LOCATIONS_16:
                sv["location"] = v.location
            svs.append(sv)
            sd = v.signed_data()
            if sd is not None:
                svs.append({**sv, "value": sd[0], "format": "SignedData"})
        if svs:
            out.append({"timestamp": s.timestamp, "sampledValue": svs})
    return out


def to_201(samples: list[Sample], context: str | None = None) -> list[dict[str, Any]]:
    """2.0.1 meterValue list. A value a 2.0.1 wallbox sent goes out as it was sent. A 1.6 value is
    rebuilt; values 2.0.1 cannot express (RPM, Temperature) are left out; a 1.6 ``SignedData`` value
    becomes the ``signedMeterValue`` of the numeric value of the same measurand, phase and context in
    its sample (``encodingMethod`` OCMF for OCMF data, else "Other"; signing method and public key are
    inside the signed data and left empty), or, without one, of a value of its own: the register as
    the signed data's sample shows it when there is one, else 0 (the signed data carries the
    reading)."""
    out = []
    for s in samples:
        svs = []
        signed16 = [v for v in s.values if v.raw_version != "2.0.1" and v.format == "SignedData"]
        for v in s.values:
            if v.raw is not None and v.raw_version == "2.0.1":
                svs.append(dict(v.raw))
                continue
            if v.format == "SignedData":
                continue
            if v.measurand not in MEASURANDS_201 or (v.phase is not None and v.phase not in PHASES_201):
                continue
            try:
                number = to_number(v.value)
            except InvalidOperation:
                continue
            if not math.isfinite(number):  # "NaN", "Infinity": no reading JSON could carry
                continue
            sv: dict[str, Any] = {"value": number, "measurand": v.measurand}
            ctx = v.context if v.context in CONTEXTS_201 else context
            if ctx:
                sv["context"] = ctx
            if v.unit:
                sv["unitOfMeasure"] = {"unit": v.unit[:20]}
            if v.phase:
                sv["phase"] = v.phase
            if v.location in LOCATIONS_201:
                sv["location"] = v.location
            key = (v.measurand, v.phase, v.context)
            match = next((x for x in signed16 if (x.measurand, x.phase, x.context) == key), None)
            if match is not None:
                signed16.remove(match)
                sv["signedMeterValue"] = _signed_201(match)
            svs.append(sv)
        for x in signed16:  # signed data without a numeric value of its own in the sample
            sv = {"value": 0, "measurand": x.measurand if x.measurand in MEASURANDS_201 else ENERGY,
                  "signedMeterValue": _signed_201(x)}
            ctx = x.context if x.context in CONTEXTS_201 else context
            if ctx:
                sv["context"] = ctx
            svs.append(sv)
        if svs:
            out.append({"timestamp": s.timestamp, "sampledValue": svs})
    return out


def _signed_201(v: Value) -> dict[str, Any]:
    data = v.value
    return {"signedMeterData": data, "signingMethod": "",
            "encodingMethod": "OCMF" if data.startswith("OCMF|") else "Other", "publicKey": ""}


def signed_values(samples: list[Sample]) -> list[dict[str, Any]]:
    """Signed meter data in ``samples`` as the bus carries it on the session: data exactly as sent."""
    out = []
    for s in samples:
        for v in s.values:
            sd = v.signed_data()
            if sd is not None:
                out.append({"data": sd[0], "format": sd[1], "context": v.context, "timestamp": s.timestamp,
                            "measurand": v.measurand})
    return out


@dataclass
class Readings:
    energy_wh: Decimal | None = None
    power_w: Decimal | None = None
    current_a: list[Decimal | None] = field(default_factory=lambda: [None, None, None])


def readings(samples: list[Sample]) -> Readings:
    """The last energy register, power and per-phase currents in ``samples``."""
    r = Readings()
    phase_energy: dict[str, Decimal] = {}
    for s in samples:
        for v in s.values:
            x = v.scaled()
            if x is None or (v.location not in (None, "Outlet", "Inlet")):
                continue
            if v.measurand == ENERGY:
                if v.phase in (None, ""):
                    r.energy_wh = x
                elif v.phase in ("L1", "L2", "L3"):
                    phase_energy[v.phase] = x
            elif v.measurand == POWER and v.phase in (None, ""):
                r.power_w = x
            elif v.measurand == CURRENT and v.phase in ("L1", "L2", "L3", "L1-N", "L2-N", "L3-N"):
                r.current_a[int(v.phase[1]) - 1] = x
    if r.energy_wh is None and phase_energy:
        r.energy_wh = sum(phase_energy.values(), Decimal(0))
    return r


def energy_of(samples: list[Sample]) -> Decimal | None:
    return readings(samples).energy_wh


def wh_int(x: Decimal | float | None) -> int:
    """The energy register as the integer Wh 1.6 wants (exact for an integral register)."""
    if x is None:
        return 0
    return int(Decimal(str(x)).to_integral_value())


# -- states -----------------------------------------------------------------------------------
# OCPP 1.6 ChargePointStatus -> (bus state, IEC 61851 state)
STATUS_16: dict[str, tuple[p.EvseState, p.IecState | None]] = {
    "Available": (p.EvseState.AVAILABLE, p.IecState.A),
    "Preparing": (p.EvseState.PREPARING, p.IecState.B),
    "Charging": (p.EvseState.CHARGING, p.IecState.C),
    "SuspendedEV": (p.EvseState.SUSPENDED, p.IecState.B),
    "SuspendedEVSE": (p.EvseState.SUSPENDED, p.IecState.B),
    "Finishing": (p.EvseState.FINISHING, p.IecState.B),
    "Reserved": (p.EvseState.AVAILABLE, p.IecState.A),
    "Unavailable": (p.EvseState.UNAVAILABLE, None),
    "Faulted": (p.EvseState.FAULTED, p.IecState.F),
}

# OCPP 2.0.1 ConnectorStatus -> bus state
STATUS_201: dict[str, tuple[p.EvseState, p.IecState | None]] = {
    "Available": (p.EvseState.AVAILABLE, p.IecState.A),
    "Occupied": (p.EvseState.PREPARING, p.IecState.B),
    "Reserved": (p.EvseState.AVAILABLE, p.IecState.A),
    "Unavailable": (p.EvseState.UNAVAILABLE, None),
    "Faulted": (p.EvseState.FAULTED, p.IecState.F),
}

# OCPP 2.0.1 ChargingState (TransactionEvent) -> bus state
CHARGING_STATE_201: dict[str, tuple[p.EvseState, p.IecState | None]] = {
    "Charging": (p.EvseState.CHARGING, p.IecState.C),
    "EVConnected": (p.EvseState.PREPARING, p.IecState.B),
    "SuspendedEV": (p.EvseState.SUSPENDED, p.IecState.B),
    "SuspendedEVSE": (p.EvseState.SUSPENDED, p.IecState.B),
    "Idle": (p.EvseState.AVAILABLE, p.IecState.A),
}


def status16_from_bus(st: p.EvseStatus, in_tx: bool) -> tuple[str, str]:
    """(ChargePointStatus, ChargePointErrorCode) for an EVSE the gateway reads from the bus."""
    if not st.online or st.state == p.EvseState.OFFLINE:
        return "Unavailable", "NoError"
    iec = st.iec_state
    if iec in (p.IecState.E, p.IecState.F) or st.state == p.EvseState.FAULTED:
        return "Faulted", "OtherError"
    if st.state == p.EvseState.UNAVAILABLE:
        return "Unavailable", "NoError"
    if iec == p.IecState.A or (iec is None and st.state == p.EvseState.AVAILABLE):
        return ("Finishing" if in_tx else "Available"), "NoError"
    if iec in (p.IecState.C, p.IecState.D) or (iec is None and st.state == p.EvseState.CHARGING):
        return "Charging", "NoError"
    # B: connected, not charging
    if not in_tx:
        return "Preparing", "NoError"
    applied = st.applied.current_a if st.applied is not None else None
    if st.state == p.EvseState.FINISHING:
        return "Finishing", "NoError"
    if applied is not None and applied <= 0:
        return "SuspendedEVSE", "NoError"
    return "SuspendedEV", "NoError"


def connector201_from16(status16: str) -> str:
    return {"Available": "Available", "Preparing": "Occupied", "Charging": "Occupied", "SuspendedEV": "Occupied",
            "SuspendedEVSE": "Occupied", "Finishing": "Occupied", "Reserved": "Reserved",
            "Unavailable": "Unavailable", "Faulted": "Faulted"}.get(status16, "Unavailable")


def charging_state201_from16(status16: str) -> str:
    return {"Charging": "Charging", "SuspendedEV": "SuspendedEV", "SuspendedEVSE": "SuspendedEVSE",
            "Preparing": "EVConnected", "Finishing": "EVConnected"}.get(status16, "Idle")


def status16_from201(connector_status: str, charging_state: str | None) -> str:
    if connector_status == "Occupied":
        return {"Charging": "Charging", "SuspendedEV": "SuspendedEV", "SuspendedEVSE": "SuspendedEVSE",
                "EVConnected": "Preparing", "Idle": "Preparing"}.get(charging_state or "", "Preparing")
    return {"Available": "Available", "Reserved": "Reserved", "Unavailable": "Unavailable",
            "Faulted": "Faulted"}.get(connector_status, "Unavailable")


STOP_REASON_16_TO_201 = {
    "EmergencyStop": "EmergencyStop", "EVDisconnected": "EVDisconnected", "HardReset": "ImmediateReset",
    "Local": "Local", "Other": "Other", "PowerLoss": "PowerLoss", "Reboot": "Reboot", "Remote": "Remote",
    "SoftReset": "Reboot", "UnlockCommand": "Other", "DeAuthorized": "DeAuthorized",
}
STOP_REASON_201_TO_16 = {
    "DeAuthorized": "DeAuthorized", "EmergencyStop": "EmergencyStop", "EVDisconnected": "EVDisconnected",
    "ImmediateReset": "HardReset", "Local": "Local", "PowerLoss": "PowerLoss", "Reboot": "Reboot",
    "Remote": "Remote", "StoppedByEV": "Local",
}
