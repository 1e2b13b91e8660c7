"""Simulated devices, one per profile, each written from the vendor's register documentation.

The register addresses here are typed in from the vendor documents independently of the YAML
profiles (see the sources in each builder), so a poller driven by a wrong profile fails against
these simulators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evse_poller.codec import DType
from evse_poller.sim.httpserver import HttpEndpoint
from evse_poller.sim.model import NOMINAL_V, ChargePoint, MeterModel
from evse_poller.sim.regmap import RegisterMap

U16, I16, U32, I32, I64, F32, F64, STR = (DType.UINT16, DType.INT16, DType.UINT32, DType.INT32, DType.INT64,
                                          DType.FLOAT32, DType.FLOAT64, DType.STRING)


@dataclass
class SimSettings:
    """Device settings an installer makes on the device itself (not over Modbus)."""

    safe_current_a: float = 6.0  # Alfen: active load balancing safe current
    validity_s: float = 60.0  # Alfen: Modbus slave max current validity time
    hw_max_current_a: float = 16.0  # Heidelberg: DIP switch S1


def _accept(cond: bool, action: Callable[[], None]) -> bool:
    if cond:
        action()
    return cond


# -- Heidelberg Energy Control ------------------------------------------------------------------
# Amperfied EC_ModBus_register_table_20210222: input 4 layout, 5 state, 6-8 current 0.1 A,
# 9 temperature 0.1 degC, 10-12 voltage V, 13 lock, 14 power VA, 15/17 energy uint32 (VAh),
# 100/101 hardware max/min A; holding 257 watchdog ms, 258 standby, 259 remote lock,
# 261 max current 0.1 A, 262 failsafe current 0.1 A (0 or 60..160).

def heidelberg(cp: ChargePoint, s: SimSettings) -> RegisterMap:
    m = RegisterMap()
    cp.watchdog_mode = "traffic"
    cp.watchdog_s = 15.0
    cp.failsafe_a = 0.0
    cp.max_current_a = s.hw_max_current_a
    if cp.commanded_a is None:
        cp.commanded_a = s.hw_max_current_a
    regs = {"wd_ms": 15000, "standby": 0, "lock": 1}
    m.on_request = cp.on_request
    m.before_read = cp.tick

    def state() -> int:
        if not cp.enabled:
            return 10  # F: wallbox locked
        allowed = cp.limit_a() >= 6.0
        if not cp.car.plugged:
            return 3 if allowed else 2  # A2 / A1
        if any(cp.draw()):
            return 7  # C2
        if cp.car.wants_charge and not allowed:
            return 6  # C1: request, not allowed
        return 5 if allowed else 4  # B2 / B1

    def tenth(x: float) -> int:
        return round(x * 10)

    def set_current(raw: int | float | str) -> bool:
        r = int(raw)
        return _accept(r == 0 or 60 <= r <= 160, lambda: cp.set_limit(r / 10))

    def set_failsafe(raw: int | float | str) -> bool:
        r = int(raw)
        return _accept(r == 0 or 60 <= r <= 160, lambda: setattr(cp, "failsafe_a", r / 10))

    def set_wd(raw: int | float | str) -> bool:
        regs["wd_ms"] = int(raw)
        cp.watchdog_s = int(raw) / 1000.0
        return True

    def set_lock(raw: int | float | str) -> bool:
        return _accept(int(raw) in (0, 1), lambda: (regs.__setitem__("lock", int(raw)), cp.set_enabled(bool(raw))))

    m.constant("input", 4, U16, 0x0108, name="layout")
    m.field("input", 5, U16, state, name="state")
    for i in range(3):
        m.field("input", 6 + i, U16, lambda i=i: tenth(cp.draw()[i]), name=f"current L{i + 1}")
    m.constant("input", 9, I16, 285, name="temperature")
    for i in range(3):
        m.constant("input", 10 + i, U16, 230, name=f"voltage L{i + 1}")
    m.field("input", 13, U16, lambda: 1, name="external lock")
    m.field("input", 14, U16, lambda: round(cp.power_w()), name="power VA")
    m.field("input", 15, U32, lambda: round(cp.energy_wh - cp.session_start_wh), name="energy since power on")
    m.field("input", 17, U32, lambda: round(cp.energy_wh), name="energy since installation")
    m.field("input", 100, U16, lambda: round(s.hw_max_current_a), name="hw max current")
    m.constant("input", 101, U16, 6, name="hw min current")
    m.field("holding", 257, U16, lambda: regs["wd_ms"], set_wd, name="watchdog timeout ms")
    m.field("holding", 258, U16, lambda: regs["standby"],
            lambda v: _accept(int(v) in (0, 4), lambda: regs.__setitem__("standby", int(v))), name="standby")
    m.field("holding", 259, U16, lambda: regs["lock"], set_lock, name="remote lock")
    m.field("holding", 261, U16, lambda: tenth(cp.commanded_a or 0.0), set_current, name="max current")
    m.field("holding", 262, U16, lambda: tenth(cp.failsafe_a), set_failsafe, name="failsafe current")
    return m


# -- Alfen Eve (NG9xx) --------------------------------------------------------------------------
# Alfen "Modbus Slave TCP/IP for NG9xx platform" v2.3, section 3.4 (socket, slave address 1):
# 300 meter state, 306.. voltages float32, 320/322/324 currents float32, 344 real power sum
# float32, 374 energy delivered sum float64 (Wh), 1200 availability, 1201 mode 3 state string(5),
# 1206 actual applied max current float32, 1208 remaining valid time uint32, 1210 max current
# float32 (R/W, both registers in one write), 1212 safe current float32, 1214 setpoint accounted,
# 1215 phases (R/W: 1 or 3). Reserved registers read NaN (0xFFFF).

def alfen(cp: ChargePoint, s: SimSettings) -> RegisterMap:
    m = RegisterMap()
    cp.watchdog_mode = "setpoint"
    cp.watchdog_s = s.validity_s
    cp.failsafe_a = s.safe_current_a
    cp.fallback_until_first_write = True
    m.on_request = cp.on_request
    m.before_read = cp.tick

    def mode3() -> str:
        if not cp.car.plugged:
            return "A"
        pwm = cp.limit_a() >= 6.0
        if any(cp.draw()):
            return "C2"
        if cp.car.wants_charge:
            return "C1" if not pwm else "B2"
        return "B2" if pwm else "B1"

    def remaining() -> int:
        if cp.last_setpoint_write is None:
            return 0
        return max(0, round(s.validity_s - (cp.clock() - cp.last_setpoint_write)))

    def set_max(v: int | float | str) -> bool:
        a = float(v)
        return _accept(0.0 <= a <= 80.0, lambda: cp.set_limit(a))

    def set_phases(v: int | float | str) -> bool:
        return _accept(int(v) in (1, 3), lambda: cp.set_phases(int(v)))

    m.constant("holding", 300, U16, 3, name="meter state")
    m.constant("holding", 301, DType.UINT64, 100, name="meter last value timestamp")
    m.constant("holding", 305, U16, 0, name="meter type")
    for i in range(3):
        m.constant("holding", 306 + 2 * i, F32, NOMINAL_V, name=f"voltage L{i + 1}-N")
        m.constant("holding", 312 + 2 * i, F32, 400.0, name=f"voltage L{i + 1}-L{i % 3 + 2}")
    m.constant("holding", 318, F32, 0.0, name="current N")
    for i in range(3):
        m.field("holding", 320 + 2 * i, F32, lambda i=i: cp.draw()[i], name=f"current L{i + 1}")
    m.field("holding", 326, F32, lambda: sum(cp.draw()), name="current sum")
    for i in range(4):
        m.constant("holding", 328 + 2 * i, F32, 1.0, name="power factor")
    m.constant("holding", 336, F32, 50.0, name="frequency")
    for i in range(3):
        m.field("holding", 338 + 2 * i, F32, lambda i=i: cp.draw()[i] * NOMINAL_V, name=f"real power L{i + 1}")
    m.field("holding", 344, F32, cp.power_w, name="real power sum")
    for i in range(3):
        m.field("holding", 346 + 2 * i, F32, lambda i=i: cp.draw()[i] * NOMINAL_V, name=f"apparent power L{i + 1}")
    m.field("holding", 352, F32, cp.power_w, name="apparent power sum")
    for i in range(4):
        m.constant("holding", 354 + 2 * i, F32, 0.0, name="reactive power")
    for i in range(3):
        m.field("holding", 362 + 4 * i, F64, lambda i=i: cp.energy_wh / max(1, cp.active_phases())
                if i < cp.active_phases() else 0.0, name=f"energy delivered L{i + 1}")
    m.field("holding", 374, F64, lambda: cp.energy_wh, name="real energy delivered sum")
    for i in range(4):
        m.constant("holding", 378 + 4 * i, F64, 0.0, name="real energy consumed")
    for i in range(8):
        m.constant("holding", 394 + 4 * i, F64, 0.0, name="apparent/reactive energy")
    m.field("holding", 1200, U16, lambda: 1 if cp.enabled else 0, name="availability")
    m.field("holding", 1201, STR, mode3, count=5, name="mode 3 state")
    m.field("holding", 1206, F32, cp.limit_a, name="actual applied max current")
    m.field("holding", 1208, U32, remaining, name="max current valid time")
    m.field("holding", 1210, F32, lambda: cp.commanded_a or 0.0, set_max, name="modbus slave max current")
    m.field("holding", 1212, F32, lambda: s.safe_current_a, name="safe current")
    m.field("holding", 1214, U16, lambda: 0 if cp.watchdog_expired() else 1, name="setpoint accounted for")
    m.field("holding", 1215, U16, lambda: cp.phase_setting, set_phases, name="charge using 1 or 3 phases")
    return m


# -- Phoenix Contact CHARX SEC-3xxx --------------------------------------------------------------
# UM EN CHARX SEC "Modbus server": 114 number of controllers; charging point n at 1000*n +
# offset: 112 meter, 232.. voltages int32 mV, 238.. currents int32 mA, 244 power int32 mW,
# 250 energy int64 Wh, 299 status 2 x ASCII, 300 charging release, 301 max current A.
# Holding and input registers return the same values.

def charx(cp: ChargePoint, s: SimSettings) -> RegisterMap:
    m = RegisterMap()
    cp.watchdog_mode = "off"
    if cp.commanded_a is None:
        cp.commanded_a = 16.0
    m.on_request = cp.on_request
    m.before_read = cp.tick
    base = 1000

    def status() -> str:
        if not cp.enabled:
            return "F0"
        if not cp.car.plugged:
            return "A1"
        if any(cp.draw()):
            return "C2"
        return "B2" if cp.limit_a() >= 6.0 else "B1"

    def set_current(v: int | float | str) -> bool:
        a = int(v)
        return _accept(a == 0 or 6 <= a <= 80, lambda: cp.set_limit(float(a)))

    def set_release(v: int | float | str) -> bool:
        return _accept(int(v) in (0, 1), lambda: cp.set_enabled(bool(int(v))))

    for table in ("holding", "input"):
        writable = table == "holding"
        m.constant(table, 100, STR, "CHARX SEC-3100", count=10, name="name")
        m.constant(table, 110, STR, "1.5.1", count=4, name="software version")
        m.constant(table, 114, U16, 1, name="controllers")
        m.constant(table, base + 112, U16, 1, name="meter")
        for i in range(3):
            m.constant(table, base + 232 + 2 * i, I32, round(NOMINAL_V * 1000), name=f"voltage L{i + 1} mV")
            m.field(table, base + 238 + 2 * i, I32, lambda i=i: round(cp.draw()[i] * 1000), name=f"current L{i + 1}")
        m.field(table, base + 244, I32, lambda: round(cp.power_w() * 1000), name="power mW")
        m.field(table, base + 250, I64, lambda: round(cp.energy_wh), name="energy Wh")
        m.field(table, base + 299, STR, status, count=1, name="status IEC 61851")
        m.field(table, base + 300, U16, lambda: 1 if cp.enabled else 0, set_release if writable else None,
                name="charging release")
        m.field(table, base + 301, U16, lambda: round(cp.commanded_a or 0), set_current if writable else None,
                name="max current")
    return m


# -- Webasto Next / Ampure Unite ------------------------------------------------------------------
# From "Webasto NEXT Modbus Register 1-00 external V3" as the implementations that follow it read it
# (OpenEMS EvcsWebastoNextImpl: FC03 for every register, "cannot read the gaps"; evcc webasto-next.go:
# "all holding type registers"; tomwellnitz/Webasto-Next-Modbus const.py): unit 255, holding 1000
# charge point state (0 no vehicle, 1 vehicle attached / no permission, 3 charging, 4 charging paused,
# 7 error, 8 reserved), 1001 charging state, 1002 EVSE state, 1004 cable state, 1006 error code,
# 1008/1010/1012 currents mA, 1014/1016/1018 voltages V, 1020 power W (u32), 1024/1028/1032 phase
# powers (u32), 1036 meter reading Wh (u32), 1100-1108 current limits, 1502 session energy,
# 2000 failsafe current 6..32 A, 2002 failsafe timeout 6..120 s, 5004 charge current 0..32 A,
# 6000 life bit. Only documented registers are defined: a read across a gap is refused.
# evcc reads the currents with FC04, so the box answers those as input registers too.

def webasto(cp: ChargePoint, s: SimSettings) -> RegisterMap:
    m = RegisterMap()
    cp.watchdog_mode = "keepalive"
    cp.watchdog_s = 20.0
    cp.failsafe_a = 16.0  # some earlier value: a refused write must leave it in place
    cp.fallback_until_first_write = True
    if cp.commanded_a is None:
        cp.commanded_a = 0.0
    regs = {"timeout": 20, "life": 0}
    m.on_request = cp.on_request
    m.before_read = cp.tick

    def cp_state() -> int:
        if not cp.enabled:
            return 7
        if not cp.car.plugged:
            return 0
        if any(cp.draw()):
            return 3  # charging
        if cp.limit_a() < 6.0 or not cp.car.wants_charge:
            return 4  # charging paused (by the box or by the car)
        return 1

    def set_failsafe(v: int | float | str) -> bool:
        a = int(v)
        return _accept(6 <= a <= 32, lambda: setattr(cp, "failsafe_a", float(a)))

    def set_timeout(v: int | float | str) -> bool:
        t = int(v)
        return _accept(6 <= t <= 120, lambda: (regs.__setitem__("timeout", t), setattr(cp, "watchdog_s", float(t))))

    def set_current(v: int | float | str) -> bool:
        a = int(v)
        return _accept(0 <= a <= 32, lambda: cp.set_limit(float(a)))

    def set_life(v: int | float | str) -> bool:
        if int(v) == 1:
            cp.keepalive()
            regs["life"] = 0  # the wallbox acknowledges by resetting the bit
        return True

    h = "holding"
    m.field(h, 1000, U16, cp_state, name="charge point state")
    m.field(h, 1001, U16, lambda: 1 if any(cp.draw()) else 0, name="charging state")
    m.field(h, 1002, U16, lambda: 1 if cp.enabled else 3, name="EVSE state")
    m.field(h, 1004, U16, lambda: 3 if cp.car.plugged else 0, name="cable state")
    m.constant(h, 1006, U16, 0, name="error code")
    for i in range(3):
        for table in (h, "input"):  # evcc reads the currents with FC04: the box answers both
            m.field(table, 1008 + 2 * i, U16, lambda i=i: round(cp.draw()[i] * 1000), name=f"current L{i + 1} mA")
        m.constant(h, 1014 + 2 * i, U16, 230, name=f"voltage L{i + 1}")
        m.field(h, 1024 + 4 * i, U32, lambda i=i: round(cp.draw()[i] * NOMINAL_V), name=f"power L{i + 1}")
    m.field(h, 1020, U32, lambda: round(cp.power_w()), name="active power")
    m.field(h, 1036, U32, lambda: round(cp.energy_wh), name="meter reading Wh")
    m.field(h, 1100, U16, lambda: round(cp.limit_a()), name="max current")
    m.constant(h, 1102, U16, 6, name="min current")
    m.field(h, 1104, U16, lambda: round(cp.max_current_a), name="max EVSE current")
    m.constant(h, 1106, U16, 32, name="max cable current")
    m.constant(h, 1108, U16, 32, name="max EV current")
    m.field("holding", 2000, U16, lambda: round(cp.failsafe_a), set_failsafe, name="failsafe current")
    m.field("holding", 2002, U16, lambda: regs["timeout"], set_timeout, name="failsafe timeout")
    m.field("holding", 5004, U16, lambda: round(cp.commanded_a or 0), set_current, name="charge current")
    m.field("holding", 6000, U16, lambda: regs["life"], set_life, name="life bit")
    return m


# -- KEBA KeContact P30 (x-series) ---------------------------------------------------------------
# "KeContact P30 Modbus TCP Programmers Guide" V1.02 (unit 255, FC 03 reads, FC 06 writes; it is not
# possible to read several registers in one request): readable UINT32 1000 charging state (0 start-up,
# 1 not ready - no vehicle or not authorised, 2 ready - waiting for the vehicle, 3 charging, 4 error,
# 5 interrupted - temperature or suspended mode), 1004 cable state (0 no cable, 1 cable at the station,
# 3 ... locked, 5 cable at the station and the vehicle, 7 ... and locked), 1006 error code, 1008/1010/1012
# currents mA, 1014 serial, 1016 product, 1018 firmware, 1020 power mW, 1036 total energy (0.1 Wh, see
# the profile), 1040/1042/1044 voltages V, 1046 power factor 0.1 %, 1100 max charging current mA, 1110 max
# supported current mA, 1500 RFID, 1502 session energy, 1550 phase switch source, 1552 phase switch state,
# 1600 failsafe current mA, 1602 failsafe timeout s; write-only UINT16 5004 charging current mA
# (6000..63000), 5010 set energy (10 Wh), 5012 unlock plug, 5014 enable (0/1), 5016 failsafe current mA,
# 5018 failsafe timeout s, 5020 failsafe persist, 5050 phase switch source, 5052 trigger phase switch
# (0: 1 phase, 1: 3 phases). Write-only registers cannot be read.

def _write_only() -> int:
    raise ValueError("write-only register")


def keba(cp: ChargePoint, s: SimSettings) -> RegisterMap:
    m = RegisterMap()
    m.max_read = 2
    cp.watchdog_mode = "keepalive"
    cp.watchdog_s = 0.0  # no failsafe until a timeout is written
    cp.failsafe_a = s.safe_current_a  # the installer's failsafe current
    if cp.commanded_a is None:
        cp.commanded_a = min(32.0, cp.max_current_a)  # DIP switch current
    regs = {"timeout": 0, "source": 3, "energy_limit": 0}
    m.on_request = cp.on_request
    m.before_read = cp.tick

    def state() -> int:
        if cp.car.plugged and not cp.enabled:
            return 5
        if not cp.car.plugged or not cp.enabled:
            return 1
        return 3 if any(cp.draw()) else 2

    def cable() -> int:
        if not cp.car.plugged:
            return 0
        return 7 if any(cp.draw()) else 5

    def set_current(v: int | float | str) -> bool:
        ma = int(v)
        return _accept(6000 <= ma <= 63000, lambda: cp.set_limit(ma / 1000))

    def set_enable(v: int | float | str) -> bool:
        return _accept(int(v) in (0, 1), lambda: cp.set_enabled(bool(int(v))))

    def set_timeout(v: int | float | str) -> bool:
        t = int(v)
        regs["timeout"] = t
        cp.watchdog_s = float(t)
        cp.keepalive()
        return True

    def set_failsafe(v: int | float | str) -> bool:
        ma = int(v)
        return _accept(ma == 0 or 6000 <= ma <= 63000, lambda: setattr(cp, "failsafe_a", ma / 1000))

    def set_phases(v: int | float | str) -> bool:
        return _accept(int(v) in (0, 1), lambda: cp.set_phases(3 if int(v) else 1))

    h = "holding"
    m.field(h, 1000, U32, state, name="charging state")
    m.field(h, 1004, U32, cable, name="cable state")
    m.constant(h, 1006, U32, 0, name="error code")
    for i in range(3):
        m.field(h, 1008 + 2 * i, U32, lambda i=i: round(cp.draw()[i] * 1000), name=f"current L{i + 1} mA")
        m.constant(h, 1040 + 2 * i, U32, 230, name=f"voltage L{i + 1}")
    m.constant(h, 1014, U32, 18416854, name="serial")
    m.constant(h, 1016, U32, 314111, name="product: P30, 32 A, x-series, MID, RFID")
    m.constant(h, 1018, U32, 0x010B0000, name="firmware")
    m.field(h, 1020, U32, lambda: round(cp.power_w() * 1000), name="active power mW")
    m.field(h, 1036, U32, lambda: round(cp.energy_wh * 10), name="total energy 0.1 Wh")
    m.constant(h, 1046, U32, 1000, name="power factor")
    m.field(h, 1100, U32, lambda: round(cp.limit_a() * 1000), name="max charging current mA")
    m.field(h, 1110, U32, lambda: round(cp.max_current_a * 1000), name="max supported current mA")
    m.constant(h, 1500, U32, 0, name="RFID")
    m.field(h, 1502, U32, lambda: round((cp.energy_wh - cp.session_start_wh) * 10), name="charged energy")
    m.field(h, 1550, U32, lambda: regs["source"], name="phase switch source")
    m.field(h, 1552, U32, lambda: 1 if cp.phase_setting == 3 else 0, name="phase switch state")
    m.field(h, 1600, U32, lambda: round(cp.failsafe_a * 1000), name="failsafe current mA")
    m.field(h, 1602, U32, lambda: regs["timeout"], name="failsafe timeout s")
    m.field(h, 5004, U16, _write_only, set_current, name="set charging current")
    m.field(h, 5010, U16, _write_only, lambda v: _accept(True, lambda: regs.__setitem__("energy_limit", int(v))),
            name="set energy")
    m.field(h, 5012, U16, _write_only, lambda v: int(v) == 0, name="unlock plug")
    m.field(h, 5014, U16, _write_only, set_enable, name="enable charging station")
    m.field(h, 5016, U16, _write_only, set_failsafe, name="failsafe current")
    m.field(h, 5018, U16, _write_only, set_timeout, name="failsafe timeout")
    m.field(h, 5020, U16, _write_only, lambda v: int(v) in (0, 1), name="failsafe persist")
    m.field(h, 5050, U16, _write_only, lambda v: _accept(int(v) in (0, 1, 2, 3),
                                                         lambda: regs.__setitem__("source", int(v))),
            name="phase switch source")
    m.field(h, 5052, U16, _write_only, set_phases, name="trigger phase switch")
    return m


# -- Vestel EVC04 -----------------------------------------------------------------------------------
# Vestel EVC04 Modbus TCP register table as quoted by evcc vestel.go and the vestel_modbus.py reader:
# unit 255; input 100 serial (25 registers), 190 brand (10), 210 model (5), 230 firmware (50), 400 max
# power W u32, 404 number of phases (0: 1 phase, 1: 3 phases), 1000 chargepoint state (0 available,
# 1 preparing, 2 charging, 3 suspended EVSE, 4 suspended EV, 5 finishing, 6 reserved, 7 unavailable,
# 8 faulted), 1001 charging state (0/1), 1002 equipment state (0 initialising, 1 running, 2 fault,
# 3 disabled, 4 updating), 1004 cable state (0 none, 1 cable without vehicle, 2 vehicle, 3 vehicle and
# locked), 1006 fault code u32, 1008/1010/1012 currents mA (u16, 1009/1011 not defined), 1014/1016/1018
# voltages V, 1020 power W u32, 1024/1028/1032 phase power W u32, 1036 meter 0.1 kWh u32, 1100 session
# max current, 1102 EVSE min, 1104 EVSE max, 1106 cable max A, 1502 session energy Wh u32, 1508 session
# duration s u32; holding 405 phase switch (0/1), 2000 failsafe current A, 2002 failsafe timeout s,
# 5004 charging current A (0: no charging), 6000 alive (write 1). Ranges as the Webasto Next's.

def vestel(cp: ChargePoint, s: SimSettings) -> RegisterMap:
    m = RegisterMap()
    cp.watchdog_mode = "keepalive"
    cp.watchdog_s = 20.0
    cp.failsafe_a = 16.0
    cp.fallback_until_first_write = True
    if cp.commanded_a is None:
        cp.commanded_a = 0.0
    regs = {"timeout": 20}
    m.on_request = cp.on_request
    m.before_read = cp.tick

    def cp_state() -> int:
        if not cp.enabled:
            return 7
        if not cp.car.plugged:
            return 0
        if any(cp.draw()):
            return 2
        return 3 if cp.limit_a() < 6.0 else 4

    def set_failsafe(v: int | float | str) -> bool:
        return _accept(6 <= int(v) <= 32, lambda: setattr(cp, "failsafe_a", float(int(v))))

    def set_timeout(v: int | float | str) -> bool:
        t = int(v)
        return _accept(6 <= t <= 120, lambda: (regs.__setitem__("timeout", t), setattr(cp, "watchdog_s", float(t))))

    def set_current(v: int | float | str) -> bool:
        a = int(v)
        return _accept(a == 0 or 6 <= a <= 32, lambda: cp.set_limit(float(a)))

    def set_alive(v: int | float | str) -> bool:
        if int(v) == 1:
            cp.keepalive()
        return True

    def set_phases(v: int | float | str) -> bool:
        return _accept(int(v) in (0, 1), lambda: cp.set_phases(3 if int(v) else 1))

    i = "input"
    m.constant(i, 100, STR, "VESTEL0001", count=25, name="serial")
    m.constant(i, 190, STR, "Vestel", count=10, name="brand")
    m.constant(i, 210, STR, "EVC04", count=5, name="model")
    m.constant(i, 230, STR, "v3.187.0-sim", count=50, name="firmware")
    m.constant(i, 400, U32, 22000, name="max power")
    m.field(i, 404, U16, lambda: 1 if cp.evse_phases == 3 else 0, name="number of phases")
    m.field(i, 1000, U16, cp_state, name="chargepoint state")
    m.field(i, 1001, U16, lambda: 1 if any(cp.draw()) else 0, name="charging state")
    m.field(i, 1002, U16, lambda: 1 if cp.enabled else 3, name="equipment state")
    m.field(i, 1004, U16, lambda: 3 if cp.car.plugged else 0, name="cable state")
    m.constant(i, 1006, U32, 0, name="fault code")
    for k in range(3):
        m.field(i, 1008 + 2 * k, U16, lambda k=k: round(cp.draw()[k] * 1000), name=f"current L{k + 1} mA")
        m.constant(i, 1014 + 2 * k, U16, 230, name=f"voltage L{k + 1}")
        m.field(i, 1024 + 4 * k, U32, lambda k=k: round(cp.draw()[k] * NOMINAL_V), name=f"power L{k + 1}")
    m.field(i, 1020, U32, lambda: round(cp.power_w()), name="active power")
    m.field(i, 1036, U32, lambda: int(cp.energy_wh / 100), name="meter reading 0.1 kWh")
    m.field(i, 1100, U16, lambda: round(cp.limit_a()), name="session max current")
    m.constant(i, 1102, U16, 6, name="EVSE min current")
    m.field(i, 1104, U16, lambda: round(cp.max_current_a), name="EVSE max current")
    m.constant(i, 1106, U16, 32, name="cable max current")
    m.field(i, 1502, U32, lambda: round(cp.energy_wh - cp.session_start_wh), name="session energy Wh")
    m.constant(i, 1508, U32, 0, name="session duration")
    h = "holding"
    m.field(h, 405, U16, lambda: 1 if cp.phase_setting == 3 else 0, set_phases, name="phase switch")
    m.field(h, 2000, U16, lambda: round(cp.failsafe_a), set_failsafe, name="failsafe current")
    m.field(h, 2002, U16, lambda: regs["timeout"], set_timeout, name="failsafe timeout")
    m.field(h, 5004, U16, lambda: round(cp.commanded_a or 0), set_current, name="charging current")
    m.field(h, 6000, U16, lambda: 0, set_alive, name="alive")
    return m


# -- cFos Power Brain ---------------------------------------------------------------------------------
# "cFos Power Brain Controller - Modbus Registers" (EVSE: unit 1, TCP port 4701; FC 03 / 06 / 16, holding
# registers): 8000 vendor id 0xcf05 (2), 8002 product id, 8003 device id, 8016 name (16), 8040 slave id;
# the charging meter: 8058 energy Wh (4), 8062 power W (2), 8064/8066/8068 current 0.1 A (2 each); the EVSE
# (as evcc cfos.go and venus-evcharger read it): 8086 disconnect CP (w), 8087 relay select (0: 3 phases,
# 1: 1 phase), 8092 charging state (0 waiting, 1 vehicle detected, 2 charging, 3 charging with
# ventilation, 4 no current, 5 error, 9 DC sensor error), 8093 charging current limit 0.1 A, 8094 charging
# enable 0/1, 8095 actual current 0.1 A, 8112 meter present. Registers not listed answer an exception.

def cfos(cp: ChargePoint, s: SimSettings) -> RegisterMap:
    m = RegisterMap()
    cp.watchdog_mode = "off"
    if cp.commanded_a is None:
        cp.commanded_a = 16.0
    m.on_request = cp.on_request
    m.before_read = cp.tick

    def state() -> int:
        if not cp.car.plugged:
            return 0
        if any(cp.draw()):
            return 2
        return 4 if cp.limit_a() < 6.0 else 1

    def set_current(v: int | float | str) -> bool:
        r = int(v)
        return _accept(r == 0 or 60 <= r <= 320, lambda: cp.set_limit(r / 10))

    h = "holding"
    m.constant(h, 8000, U32, 0xCF05, name="vendor id")
    m.constant(h, 8002, U16, 1, name="product id")
    m.constant(h, 8003, U16, 0x100, name="device id")
    m.constant(h, 8016, STR, "cFos Power Brain Controller", count=16, name="name")
    m.constant(h, 8040, U16, 1, name="slave id")
    m.field(h, 8058, DType.UINT64, lambda: round(cp.energy_wh), name="energy Wh")
    m.field(h, 8062, I32, lambda: round(cp.power_w()), name="power W")
    for i in range(3):
        m.field(h, 8064 + 2 * i, I32, lambda i=i: round(cp.draw()[i] * 10), name=f"current L{i + 1} 0.1 A")
    m.field(h, 8086, U16, lambda: 0, lambda v: int(v) in (0, 5), name="disconnect CP")
    m.field(h, 8087, U16, lambda: 1 if cp.phase_setting == 1 else 0,
            lambda v: _accept(int(v) in (0, 1), lambda: cp.set_phases(1 if int(v) else 3)), name="relay select")
    m.field(h, 8092, U16, state, name="charging state")
    m.field(h, 8093, U16, lambda: round((cp.commanded_a or 0.0) * 10), set_current, name="charging current limit")
    m.field(h, 8094, U16, lambda: 1 if cp.enabled else 0,
            lambda v: _accept(int(v) in (0, 1), lambda: cp.set_enabled(bool(int(v)))), name="charging enable")
    m.field(h, 8095, U16, lambda: round(max(cp.draw()) * 10), name="actual current")
    m.constant(h, 8112, U16, 1, name="meter present")
    return m


# -- go-eCharger (HOME+/HOMEfix, Gemini, API v2 firmware) -----------------------------------------------
# go-eCharger API v2 "Modbus" (modbus-en.md): TCP port 502; FC 03 and 04 read, FC 16 writes (FC 06 is not
# supported). Input registers: 100 CAR_STATE (0 unknown/defective, 1 ready - no car, 2 charging, 3 waiting
# for the car, 4 charging finished - car connected), 101 PP cable A, 105 firmware (2 registers ASCII),
# 107 error, 108/110/112 voltage L1..L3 V (uint32), 114/116/118 current L1..L3 0.1 A (uint32), 120 total
# power 0.01 kW (uint32), 128 total energy 0.1 kWh (uint32), 132 session energy deka-watt-seconds,
# 144 voltage N, 146/148/150 power L1..L3 0.1 kW, 152..158 power factors %, 200 ALLOW, 202 adapter,
# 203 unlocked by, 205 phases (flags). Holding registers: 200 ALLOW (0/1), 201 access state, 204 cable
# lock mode, 206 LED brightness, 211 ampere max, 212..216 button levels, 299 AMPERE_VOLATILE (6..32 A, not
# stored), 300 AMPERE_EEPROM (6..32 A), 332 PHASE_SWITCH_MODE (0 auto, 1 one phase, 2 three phases),
# 333 ENERGY_LIMIT (float64 Wh), 337 FORCE_STATE (0 neutral, 1 off, 2 on).

def goe(cp: ChargePoint, s: SimSettings) -> RegisterMap:
    m = RegisterMap()
    m.functions = frozenset({3, 4, 16})
    cp.watchdog_mode = "off"
    if cp.commanded_a is None:
        cp.commanded_a = 16.0
    regs = {"psm": 0, "access": 0, "force": 0, "eeprom": 16}
    m.on_request = cp.on_request
    m.before_read = cp.tick

    def car_state() -> int:
        if not cp.car.plugged:
            return 1
        if any(cp.draw()):
            return 2
        return 3 if cp.car.wants_charge else 4

    def amps(v: int | float | str) -> bool:
        a = int(v)
        return _accept(6 <= a <= 32, lambda: cp.set_limit(float(a)))

    def set_psm(v: int | float | str) -> bool:
        r = int(v)
        return _accept(r in (0, 1, 2), lambda: (regs.__setitem__("psm", r), cp.set_phases(1 if r == 1 else 3)))

    i, h = "input", "holding"
    m.field(i, 100, U16, car_state, name="CAR_STATE")
    m.constant(i, 101, U16, 32, name="PP_CABLE")
    m.constant(i, 105, STR, "0560", count=2, name="FWV")
    m.constant(i, 107, U16, 0, name="ERROR")
    for k in range(3):
        m.constant(i, 108 + 2 * k, U32, 230, name=f"VOLT_L{k + 1}")
        m.field(i, 114 + 2 * k, U32, lambda k=k: round(cp.draw()[k] * 10), name=f"AMP_L{k + 1}")
        m.field(i, 146 + 2 * k, U32, lambda k=k: round(cp.draw()[k] * NOMINAL_V / 100), name=f"POWER_L{k + 1}")
        m.constant(i, 152 + 2 * k, U32, 100, name=f"POWER_FACTOR_L{k + 1}")
    m.field(i, 120, U32, lambda: round(cp.power_w() / 10), name="POWER_TOTAL 0.01 kW")
    m.field(i, 128, U32, lambda: int(cp.energy_wh / 100), name="ENERGY_TOTAL 0.1 kWh")
    m.field(i, 132, U32, lambda: round((cp.energy_wh - cp.session_start_wh) * 360), name="ENERGY_CHARGE daWs")
    m.constant(i, 144, U32, 0, name="VOLT_N")
    m.constant(i, 158, U32, 0, name="POWER_FACTOR_N")
    m.field(i, 200, U16, lambda: 1 if cp.enabled else 0, name="ALLOW")
    m.constant(i, 202, U16, 0, name="ADAPTER_INPUT")
    m.constant(i, 203, U16, 0, name="UNLOCKED_BY")
    m.field(i, 205, U16, lambda: 0b00111000 | (0b111 if any(cp.draw()) else 0), name="PHASES")
    m.field(h, 200, U16, lambda: 1 if cp.enabled else 0,
            lambda v: _accept(int(v) in (0, 1), lambda: cp.set_enabled(bool(int(v)))), name="ALLOW")
    m.field(h, 201, U16, lambda: regs["access"],
            lambda v: _accept(int(v) in (0, 1, 2, 3), lambda: regs.__setitem__("access", int(v))), name="ACCESS_STATE")
    m.field(h, 211, U16, lambda: round(cp.max_current_a), name="AMPERE_MAX")
    m.field(h, 299, U16, lambda: round(cp.commanded_a or 0), amps, name="AMPERE_VOLATILE")
    m.field(h, 300, U16, lambda: regs["eeprom"],
            lambda v: _accept(6 <= int(v) <= 32, lambda: regs.__setitem__("eeprom", int(v))), name="AMPERE_EEPROM")
    m.field(h, 332, U16, lambda: regs["psm"], set_psm, name="PHASE_SWITCH_MODE")
    m.field(h, 337, U16, lambda: regs["force"],
            lambda v: _accept(int(v) in (0, 1, 2), lambda: regs.__setitem__("force", int(v))), name="FORCE_STATE")
    return m


# -- Mennekes AMTRON Xtra / Premium (HCC3) ------------------------------------------------------------
# "Description Modbus_AMTRON HCC3_v01_2021-06-25" as evcc mennekes-hcc3.go and MennekesAmtronWallbox read it:
# unit 255; input 0x0300 internal temperature, 0x0301 external temperature, 0x0302 CP state (1, 2: A;
# 3, 4: B; 5, 6: C), 0x0303 PP state, 0x0304 HCC3 error code, 0x0305 AMTRON state, 0x0306 operation mode,
# 0x0307 connector type, 0x0308 number of phases, 0x0309 rated current, 0x030A installation current,
# 0x030B serial (u32), 0x030D charging session meter count Wh (u32), 0x030F actual power W (u32) - 32-bit
# values low word first -, 0x0311 wallbox name (11 registers), 0x031D max current T1, 0x031E/0x031F start
# hour/minute T1; holding 0x0400 charging current A (0 disables, 6..32).

def amtron_hcc3(cp: ChargePoint, s: SimSettings) -> RegisterMap:
    m = RegisterMap()
    cp.watchdog_mode = "off"
    if cp.commanded_a is None:
        cp.commanded_a = 16.0
    m.on_request = cp.on_request
    m.before_read = cp.tick
    lsw = "little"

    def cp_state() -> int:
        if not cp.car.plugged:
            return 1
        if any(cp.draw()):
            return 6
        return 4 if cp.limit_a() >= 6.0 else 3

    def set_current(v: int | float | str) -> bool:
        a = int(v)
        return _accept(a == 0 or 6 <= a <= 32, lambda: cp.set_limit(float(a)))

    i = "input"
    m.constant(i, 0x0300, U16, 21, name="internal temperature")
    m.constant(i, 0x0301, U16, 12, name="external temperature")
    m.field(i, 0x0302, U16, cp_state, name="CP state")
    m.field(i, 0x0303, U16, lambda: 4 if cp.car.plugged else 0, name="PP state")
    m.constant(i, 0x0304, U16, 0, name="HCC3 error code")
    m.constant(i, 0x0305, U16, 0, name="AMTRON state")
    m.constant(i, 0x0306, U16, 1, name="operation mode")
    m.constant(i, 0x0307, U16, 2, name="connector type")
    m.field(i, 0x0308, U16, lambda: cp.evse_phases, name="number of phases")
    m.constant(i, 0x0309, U16, 32, name="rated current")
    m.field(i, 0x030A, U16, lambda: round(cp.max_current_a), name="installation current")
    m.field(i, 0x030B, U32, lambda: 1234567890, word_order=lsw, name="serial number")
    m.field(i, 0x030D, U32, lambda: round(cp.energy_wh - cp.session_start_wh), word_order=lsw,
            name="charging session meter count")
    m.field(i, 0x030F, U32, lambda: round(cp.power_w()), word_order=lsw, name="actual power consumption")
    m.constant(i, 0x0311, STR, "AMTRON", count=11, name="wallbox name")
    m.constant(i, 0x031D, U16, 16, name="max current T1")
    m.constant(i, 0x031E, U16, 4, name="start hour T1")
    m.constant(i, 0x031F, U16, 30, name="start minute T1")
    m.field("holding", 0x0400, U16, lambda: round(cp.commanded_a or 0), set_current, name="charging current")
    return m


# -- ABL eMH1/2/3 (Modbus ASCII) ----------------------------------------------------------------
# ABL eMH interface description (evcc abl.go, esphome-abl-emh1): holding 0x0001 firmware
# (2 registers), 0x0004 state (low byte), 0x0005 modify state (0xA1A1 enable, 0xE0E0 disable),
# 0x0014 Icmax as duty cycle 0.1 % (A / 0.06; 1000 = 100 % = no charging),
# 0x002E..0x0032 status report: 0x2E<<8 | state, flags/duty, then the currents in 0.1 A - L3, L2, L1 as evcc
# reads them (abl.go, "ABL: switch phase order"; esphome-abl-emh1 reads L1 first, see the profile).

def abl(cp: ChargePoint, s: SimSettings) -> RegisterMap:
    m = RegisterMap()
    cp.watchdog_mode = "off"
    if cp.commanded_a is None:
        cp.commanded_a = 6.0
    duty = {"raw": 100}
    m.on_request = cp.on_request
    m.before_read = cp.tick

    def state() -> int:
        if not cp.enabled:
            return 0xE0
        if not cp.car.plugged:
            return 0xA1
        if any(cp.draw()):
            return 0xC2
        return 0xB2 if cp.limit_a() >= 6.0 else 0xB1

    def set_icmax(v: int | float | str) -> bool:
        r = int(v)
        if r == 1000:
            return _accept(True, lambda: (duty.__setitem__("raw", r), cp.set_limit(0.0)))
        return _accept(80 <= r <= 533, lambda: (duty.__setitem__("raw", r), cp.set_limit(r * 0.06)))

    def modify(v: int | float | str) -> bool:
        r = int(v)
        if r == 0xA1A1:
            cp.set_enabled(True)
            return True
        if r == 0xE0E0:
            cp.set_enabled(False)
            return True
        return False

    def current(i: int) -> int:
        if cp.iec() != "C":
            return 1000  # not measured / no current flowing
        return round(cp.draw()[i] * 10)

    m.constant("holding", 0x0001, U32, 0x0112_0020, name="firmware (current sensor fitted)")
    m.field("holding", 0x0004, U16, state, name="state")
    m.field("holding", 0x0005, U16, lambda: 0xA1A1 if cp.enabled else 0xE0E0, modify, name="modify state")
    m.field("holding", 0x0014, U16, lambda: duty["raw"], set_icmax, name="Icmax duty cycle")
    m.field("holding", 0x002E, U16, lambda: 0x2E00 | state(), name="status report")
    m.field("holding", 0x002F, U16, lambda: duty["raw"] & 0x03FF, name="flags / duty")
    for i in range(3):
        m.field("holding", 0x0032 - i, U16, lambda i=i: current(i), name=f"current L{i + 1}")
    return m


# -- meters -------------------------------------------------------------------------------------
# Eastron SDM630 Modbus protocol: input registers, float32 high word first, 0x00/02/04 voltages,
# 0x06/08/0A currents, 0x0C/0E/10 phase powers, 0x34 total power, 0x46 frequency, 0x48 import kWh,
# 0x4A export kWh. The meter answers every address of its parameter range (unused ones read 0).

def sdm630(meter: MeterModel) -> RegisterMap:
    m = RegisterMap()
    m.before_read = meter.tick
    for i in range(3):
        m.field("input", 0x00 + 2 * i, F32, lambda: meter.voltage_v, name=f"voltage L{i + 1}")
        m.field("input", 0x06 + 2 * i, F32, lambda i=i: abs(meter.currents()[i]), name=f"current L{i + 1}")
        m.field("input", 0x0C + 2 * i, F32, lambda i=i: meter.phase_power()[i], name=f"power L{i + 1}")
    m.field("input", 0x34, F32, lambda: sum(meter.phase_power()), name="total system power")
    m.constant("input", 0x46, F32, 50.0, name="frequency")
    m.field("input", 0x48, F32, lambda: meter.import_wh / 1000.0, name="import kWh")
    m.field("input", 0x4A, F32, lambda: meter.export_wh / 1000.0, name="export kWh")
    m.filler("input", 0x00, 0x4F)
    return m


# Eastron SDM72D-M (and SDM72D-M-2) user manual, part 3 "Modbus Protocol", input registers (FC 04),
# every parameter an IEEE 754 float in two registers, high word first: 0x00/02/04 phase voltages,
# 0x06/08/0A phase currents, 0x0C/0E/10 phase active power, 0x12.. apparent, 0x18.. reactive,
# 0x1E.. power factor, 0x34 total system power, 0x38 VA, 0x3C VAr, 0x3E PF, 0x46 frequency,
# 0x48 total import kWh, 0x4A total export kWh, 0x156 total kWh (import + export), 0x180/0x184/0x186
# resettable total/import/export kWh, 0x500/0x502 total import/export active power W. "Each request
# for data must be restricted to 30 parameters or less": a longer read is answered with an exception.

def sdm72(meter: MeterModel) -> RegisterMap:
    m = RegisterMap()
    m.before_read = meter.tick
    m.max_read = 60
    inp = "input"

    def p(i: int) -> float:
        return meter.phase_power()[i]

    for i in range(3):
        m.field(inp, 0x00 + 2 * i, F32, lambda: meter.voltage_v, name=f"phase {i + 1} line to neutral volts")
        m.field(inp, 0x06 + 2 * i, F32, lambda i=i: abs(meter.currents()[i]), name=f"phase {i + 1} current")
        m.field(inp, 0x0C + 2 * i, F32, lambda i=i: p(i), name=f"phase {i + 1} active power")
        m.field(inp, 0x12 + 2 * i, F32, lambda i=i: abs(p(i)), name=f"phase {i + 1} apparent power")
        m.constant(inp, 0x18 + 2 * i, F32, 0.0, name=f"phase {i + 1} reactive power")
        m.field(inp, 0x1E + 2 * i, F32, lambda i=i: 1.0 if p(i) >= 0 else -1.0, name=f"phase {i + 1} power factor")
    m.field(inp, 0x34, F32, lambda: sum(meter.phase_power()), name="total system power")
    m.field(inp, 0x38, F32, lambda: sum(abs(x) for x in meter.phase_power()), name="total system VA")
    m.constant(inp, 0x3C, F32, 0.0, name="total system VAr")
    m.constant(inp, 0x3E, F32, 1.0, name="total system power factor")
    m.constant(inp, 0x46, F32, 50.0, name="frequency")
    m.field(inp, 0x48, F32, lambda: meter.import_wh / 1000.0, name="total import kWh")
    m.field(inp, 0x4A, F32, lambda: meter.export_wh / 1000.0, name="total export kWh")
    m.field(inp, 0x156, F32, lambda: (meter.import_wh + meter.export_wh) / 1000.0, name="total kWh")
    m.field(inp, 0x180, F32, lambda: (meter.import_wh + meter.export_wh) / 1000.0, name="resettable total kWh")
    m.field(inp, 0x184, F32, lambda: meter.import_wh / 1000.0, name="resettable import kWh")
    m.field(inp, 0x186, F32, lambda: meter.export_wh / 1000.0, name="resettable export kWh")
    m.field(inp, 0x500, F32, lambda: max(0.0, sum(meter.phase_power())), name="total import active power")
    m.field(inp, 0x502, F32, lambda: max(0.0, -sum(meter.phase_power())), name="total export active power")
    m.filler(inp, 0x00, 0x4F)  # parameters not valid for the wiring read zero
    return m


# Carlo Gavazzi EM24 Ethernet ("EM24_E1 (Ethernet) Communication Protocol", version 0 revision 1.2), as
# the implementations read it (volkszaehler/mbmd carlogavazzi-em24_e1.go, openWB carlo_gavazzi counter.py):
# unit 1, FC 03 and 04 answer the same table; INT32 values least significant word first; 0x00/02/04
# V L-N (V x 10), 0x06/08/0A V L-L, 0x0C/0E/10 A L (A x 1000), 0x12/14/16 W L (W x 10), 0x18.. VA L,
# 0x1E.. var L, 0x24 V L-N sys, 0x26 V L-L sys, 0x28 W sys (W x 10), 0x2A VA sys, 0x2C var sys,
# 0x2E..0x31 PF L1..L3, sys (INT16 x 1000), 0x32 phase sequence, 0x33 Hz (INT16 x 10), 0x34 kWh (+) TOT
# (kWh x 10), 0x36 kvarh (+) TOT, 0x40/42/44 kWh (+) L1..L3, 0x4E kWh (-) TOT, 0x50 kvarh (-) TOT.

def em24_e1(meter: MeterModel) -> RegisterMap:
    m = RegisterMap()
    m.before_read = meter.tick
    lsw = "little"

    def w10(x: float) -> int:
        return round(x * 10)

    for table in ("input", "holding"):
        def f(addr: int, get: Callable[[], int | float], name: str, dtype: DType = I32, table: str = table) -> None:
            m.field(table, addr, dtype, get, word_order=lsw if dtype is I32 else "big", name=name)

        for i in range(3):
            f(0x00 + 2 * i, lambda: w10(meter.voltage_v), f"V L{i + 1}-N")
            f(0x06 + 2 * i, lambda: w10(meter.voltage_v * 3 ** 0.5), f"V L{i + 1}-L{i % 3 + 2}")
            f(0x0C + 2 * i, lambda i=i: round(meter.currents()[i] * 1000), f"A L{i + 1}")
            f(0x12 + 2 * i, lambda i=i: w10(meter.phase_power()[i]), f"W L{i + 1}")
            f(0x18 + 2 * i, lambda i=i: w10(abs(meter.phase_power()[i])), f"VA L{i + 1}")
            f(0x1E + 2 * i, lambda: 0, f"var L{i + 1}")
            f(0x2E + i, lambda: 1000, f"PF L{i + 1}", I16)
        f(0x24, lambda: w10(meter.voltage_v), "V L-N sys")
        f(0x26, lambda: w10(meter.voltage_v * 3 ** 0.5), "V L-L sys")
        f(0x28, lambda: w10(sum(meter.phase_power())), "W sys")
        f(0x2A, lambda: w10(sum(abs(x) for x in meter.phase_power())), "VA sys")
        f(0x2C, lambda: 0, "var sys")
        f(0x31, lambda: 1000, "PF sys", I16)
        f(0x32, lambda: 0, "phase sequence", I16)
        f(0x33, lambda: 500, "Hz", I16)
        f(0x34, lambda: int(meter.import_wh / 100), "kWh (+) TOT")
        f(0x36, lambda: 0, "kvarh (+) TOT")
        for i in range(3):
            f(0x40 + 2 * i, lambda: int(meter.import_wh / 300), f"kWh (+) L{i + 1}")
        f(0x4E, lambda: int(meter.export_wh / 100), "kWh (-) TOT")
        f(0x50, lambda: 0, "kvarh (-) TOT")
        m.filler(table, 0x00, 0x51)
    return m


# SunSpec: "SunS" at 40000, common model 1 (L = 65) at 40002, meter model 203 (L = 105) at 40069,
# end marker 0xFFFF at 40176. Model 203 offsets (sunspec/models model_203.json): 2 A, 3-5 AphA-C,
# 6 A_SF, 7 PhV, 8-10 PhVphA-C, 15 V_SF, 16 Hz, 17 Hz_SF, 18 W, 19-21 WphA-C, 22 W_SF,
# 38 TotWhExp (acc32), 46 TotWhImp (acc32), 54 TotWh_SF.

SUNSPEC_BASE = 40000
SUNSPEC_203_AT = SUNSPEC_BASE + 2 + 2 + 65


def sunspec_meter(meter: MeterModel) -> RegisterMap:
    m = RegisterMap()
    m.before_read = meter.tick
    h = "holding"
    m.constant(h, SUNSPEC_BASE, STR, "SunS", count=2, name="SunS")
    c = SUNSPEC_BASE + 2
    m.constant(h, c, U16, 1, name="common ID")
    m.constant(h, c + 1, U16, 65, name="common L")
    m.constant(h, c + 2, STR, "chargegate", count=16, name="Mn")
    m.constant(h, c + 18, STR, "sim-meter-203", count=16, name="Md")
    m.filler(h, c + 34, c + 41)  # Opt (not used)
    m.constant(h, c + 42, STR, "1.0", count=8, name="Vr")
    m.constant(h, c + 50, STR, "SIM0001", count=16, name="SN")
    m.constant(h, c + 66, U16, 1, name="DA")
    b = SUNSPEC_203_AT
    a_sf, v_sf, w_sf = -2, -1, 1
    m.constant(h, b, U16, 203, name="ID")
    m.constant(h, b + 1, U16, 105, name="L")
    m.field(h, b + 2, I16, lambda: round(sum(meter.currents()) / 10**a_sf), name="A")
    for i in range(3):
        m.field(h, b + 3 + i, I16, lambda i=i: round(meter.currents()[i] / 10**a_sf), name=f"Aph{'ABC'[i]}")
        m.field(h, b + 8 + i, I16, lambda: round(meter.voltage_v / 10**v_sf), name=f"PhVph{'ABC'[i]}")
        m.field(h, b + 19 + i, I16, lambda i=i: round(meter.phase_power()[i] / 10**w_sf), name=f"Wph{'ABC'[i]}")
    m.constant(h, b + 6, I16, a_sf, name="A_SF")
    m.field(h, b + 7, I16, lambda: round(meter.voltage_v / 10**v_sf), name="PhV")
    m.constant(h, b + 15, I16, v_sf, name="V_SF")
    m.constant(h, b + 16, I16, 5000, name="Hz")
    m.constant(h, b + 17, I16, -2, name="Hz_SF")
    m.field(h, b + 18, I16, lambda: round(sum(meter.phase_power()) / 10**w_sf), name="W")
    m.constant(h, b + 22, I16, w_sf, name="W_SF")
    m.field(h, b + 38, U32, lambda: round(meter.export_wh), name="TotWhExp")
    m.field(h, b + 46, U32, lambda: round(meter.import_wh), name="TotWhImp")
    m.constant(h, b + 54, I16, 0, name="TotWh_SF")
    m.filler(h, b + 2, b + 106, value=0x8000)  # unimplemented points read "not implemented"
    m.constant(h, b + 107, U16, 0xFFFF, name="end ID")
    m.constant(h, b + 108, U16, 0, name="end L")
    return m


# -- meters over HTTP ---------------------------------------------------------------------------
# Shelly Pro 3EM, Gen2 RPC over HTTP GET (Shelly API docs, ComponentsAndServices/EM and EMData):
# /rpc/EM.GetStatus?id=0 -> {"id": 0, "a_current": A, "a_voltage": V, "a_act_power": W, "a_aprt_power": VA,
# "a_pf": .., "a_freq": Hz, b_*, c_* likewise, "n_current": null (no neutral CT), "total_current": A,
# "total_act_power": W, "total_aprt_power": VA, "user_calibrated_phase": []}; currents are magnitudes,
# powers signed (negative = returned to the grid). /rpc/EMData.GetStatus?id=0 -> {"id": 0,
# "a_total_act_energy": Wh, "a_total_act_ret_energy": Wh, b_*, c_*, "total_act": Wh, "total_act_ret": Wh}.

def shelly_pro_3em(meter: MeterModel, ep: HttpEndpoint) -> None:
    def em() -> dict[str, Any]:
        meter.tick()
        out: dict[str, Any] = {"id": 0}
        amps = meter.currents()
        for i, ph in enumerate("abc"):
            w = amps[i] * meter.voltage_v
            out[f"{ph}_current"] = round(abs(amps[i]), 3)
            out[f"{ph}_voltage"] = round(meter.voltage_v, 1)
            out[f"{ph}_act_power"] = round(w, 1)
            out[f"{ph}_aprt_power"] = round(abs(w), 1)
            out[f"{ph}_pf"] = 1.0 if abs(w) > 0 else 0.0
            out[f"{ph}_freq"] = 50.0
        out["n_current"] = None
        out["total_current"] = round(sum(abs(a) for a in amps), 3)
        out["total_act_power"] = round(sum(a * meter.voltage_v for a in amps), 3)
        out["total_aprt_power"] = round(sum(abs(a) * meter.voltage_v for a in amps), 3)
        out["user_calibrated_phase"] = []
        return out

    def emdata() -> dict[str, Any]:
        meter.tick()
        out: dict[str, Any] = {"id": 0}
        for ph in "abc":
            out[f"{ph}_total_act_energy"] = round(meter.import_wh / 3, 2)
            out[f"{ph}_total_act_ret_energy"] = round(meter.export_wh / 3, 2)
        out["total_act"] = round(meter.import_wh, 2)
        out["total_act_ret"] = round(meter.export_wh, 2)
        return out

    ep.route("/rpc/EM.GetStatus?id=0", em)
    ep.route("/rpc/EMData.GetStatus?id=0", emdata)


HTTP_METER_SIMS: dict[str, Callable[[MeterModel, HttpEndpoint], None]] = {
    "shelly-pro-3em": shelly_pro_3em,
}

EVSE_SIMS: dict[str, Callable[[ChargePoint, SimSettings], RegisterMap]] = {
    "heidelberg-energy-control": heidelberg,
    "alfen-eve": alfen,
    "phoenix-charx": charx,
    "webasto-next": webasto,
    "abl-emh": abl,
    "keba-p30": keba,
    "vestel-evc04": vestel,
    "cfos-power-brain": cfos,
    "go-e-charger": goe,
    "mennekes-amtron-hcc3": amtron_hcc3,
}
METER_SIMS: dict[str, Callable[[MeterModel], RegisterMap]] = {
    "sdm630": sdm630,
    "sdm72d-m": sdm72,
    "carlo-gavazzi-em24": em24_e1,
    "sunspec-meter": sunspec_meter,
}
