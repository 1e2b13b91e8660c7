"""What a simulation runs against: house load, cars, operator limits and tariffs (parsed from text, no I/O).

* **House load** (``--load house.csv``): the non-EV current per circuit node and grid phase over time.
  The format is what ``chargegate history house-load`` exports: a header ``ts,node,l1_a,l2_a,l3_a``,
  one row per change (the export writes one per minute and metered node); ``ts`` ISO 8601 (with an
  offset; without one it is the site's local time), ``node`` a circuit id of the configuration
  (column optional: the grid connection), currents in A (negative: export, e.g. PV). A value holds
  until the node's next row; before its first row the first row's value holds. A node's value is
  everything that is not an EV flowing through it, its sub-distributions included (as a meter there
  would show it minus the EVSEs below); a node without rows carries what its children's rows add up
  to. ``;`` as separator with decimal commas is read too (a German-style spreadsheet).
* **Synthetic profiles** (``--profile household[:kwh=4500,pv=0,heatpump=0,seed=1]`` or
  ``flat:a=8`` / ``flat:l1=10,l2=4,l3=2``) at the grid connection, minute by minute.
* **Cars** (``cars.yaml``, :class:`CarsFile`) and **limits and tariffs** (``limits.yaml``,
  :class:`LimitsFile`): see their models; times are local (``site.timezone``).
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from datetime import date as Date
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from chargegate.config import ConfigError
from chargegate.config.base import Ident, Strict
from chargegate.config.controller import ALL_DAYS, Day
from chargegate.topics import format_loc

_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
HHMM = Annotated[str, Field(description="HH:MM local time")]
MAX_ABS_A = 1000.0


def _hhmm(v: str) -> str:
    if not _HHMM.match(v):
        raise ValueError(f"{v!r} is not a time HH:MM")
    return v


def hhmm_time(s: str) -> time:
    h, m = s.split(":")
    return time(int(h), int(m))


class CarSpec(Strict):
    """One car's stays at one EVSE: it arrives at ``arrive`` on each of ``days`` and leaves at ``depart``
    (the next day when that is not later than ``arrive``), wanting ``need_kwh`` each time."""

    id: Ident
    evse: Ident = Field(description="the EVSE it plugs into")
    arrive: str = Field(description="HH:MM local time")
    depart: str = Field(description="HH:MM local time; not later than arrive: the next day")
    days: list[Day] = Field(default_factory=lambda: list(ALL_DAYS), description="days it arrives on")
    need_kwh: float = Field(gt=0, le=500, description="energy it wants per stay, at the wallbox (AC)")
    capacity_kwh: float = Field(default=60.0, gt=0, le=500, description="battery (for the state of charge)")
    soc_start_pct: float | None = Field(default=None, ge=0, le=100,
                                        description="state of charge at arrival; default 100 % minus the need")
    max_current_a: float = Field(default=16.0, gt=0, le=80, description="its on-board charger, per phase")
    phases: Literal[1, 3] = Field(default=3, description="phases its charger uses (1: on the EVSE's L1)")
    delay_s: float = Field(default=2.0, ge=0, le=60,
                           description="it follows a new setpoint this long after it was sent (at least one cycle)")
    mode: Literal["rules", "now", "off", "solar", "solar+min"] | None = Field(
        default=None, description="the charging mode set for its EVSE while it is plugged in (default: none, rules)")
    target_kwh: float | None = Field(default=None, gt=0, le=500, description="session target (with by)")
    by: str | None = Field(default=None, description="HH:MM: the session target's deadline")

    _v_arrive = field_validator("arrive", "depart")(classmethod(lambda cls, v: _hhmm(v)))

    @field_validator("by")
    @classmethod
    def _by(cls, v: str | None) -> str | None:
        return None if v is None else _hhmm(v)

    @model_validator(mode="after")
    def _consistent(self) -> CarSpec:
        if (self.target_kwh is None) != (self.by is None):
            raise ValueError("target_kwh and by go together")
        if self.soc_start_pct is not None and self.soc_start_pct + 100 * self.need_kwh / self.capacity_kwh > 100 + 1e-9:
            raise ValueError(f"need_kwh {self.need_kwh:g} does not fit in the battery from soc_start_pct "
                             f"{self.soc_start_pct:g} % of capacity_kwh {self.capacity_kwh:g}")
        if self.need_kwh > self.capacity_kwh:
            raise ValueError(f"need_kwh {self.need_kwh:g} is more than capacity_kwh {self.capacity_kwh:g}")
        return self

    @property
    def soc_start(self) -> float:
        """State of charge at arrival, 0..1."""
        if self.soc_start_pct is not None:
            return self.soc_start_pct / 100
        return max(0.0, 1.0 - self.need_kwh / self.capacity_kwh)


class CarsFile(Strict):
    cars: list[CarSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> CarsFile:
        ids = [c.id for c in self.cars]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"car ids must be unique: {', '.join(dup)}")
        return self


class Period(Strict):
    """A daily period: ``start`` to ``end`` local time (across midnight when ``end`` is not later) on each of
    ``days``, or only on ``date``."""

    start: str = Field(description="HH:MM local time")
    end: str = Field(description="HH:MM local time; not later than start: the next day")
    days: list[Day] = Field(default_factory=lambda: list(ALL_DAYS))
    date: Date | None = Field(default=None, description="only on this day (then days is ignored)")

    _v_times = field_validator("start", "end")(classmethod(lambda cls, v: _hhmm(v)))


class LimitSpec(Period):
    """An operator's limit (``grid/limit/<source>``) during the period, e.g. a §14a curtailment evening."""

    source: Literal["dso", "supplier", "local"] = "dso"
    power_w: float | None = Field(default=None, gt=0, le=10_000_000)
    current_a: Annotated[list[Annotated[float, Field(ge=0, le=1000)]], Field(min_length=3, max_length=3)] | None = None
    scope: Literal["grid", "controllable"] | None = Field(default=None,
                                                          description="default: controller.grid_limit_scope")
    ends: Literal["deactivate", "expire"] = Field(
        default="deactivate", description="deactivate: the operator ends it; expire: its publisher stops and it "
                                          "runs out (the controller's failsafe follows)")
    id: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _bound(self) -> LimitSpec:
        if self.power_w is None and self.current_a is None:
            raise ValueError("a limit needs power_w or current_a")
        return self


class TariffSpec(Period):
    level: Literal["low", "normal", "high"]
    price_ct_per_kwh: float | None = Field(default=None, ge=-1000, le=1000)


class PricesSpec(Strict):
    """ct/kWh per tariff level; ``default`` when no tariff is known. Missing: the site's history.prices."""

    low: float | None = Field(default=None, ge=-1000, le=1000)
    normal: float | None = Field(default=None, ge=-1000, le=1000)
    high: float | None = Field(default=None, ge=-1000, le=1000)
    default: float | None = Field(default=None, ge=-1000, le=1000)
    currency: str | None = Field(default=None, min_length=1, max_length=8)


class LimitsFile(Strict):
    limits: list[LimitSpec] = Field(default_factory=list)
    tariffs: list[TariffSpec] = Field(default_factory=list)
    prices: PricesSpec = Field(default_factory=PricesSpec)


# -- parsing --------------------------------------------------------------------------------------------------


def _validate(model: type[Strict], data: Any, source: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"the document must be a mapping, got {type(data).__name__}")])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            msg = err.get("msg", "invalid")
            if err.get("type") == "extra_forbidden":
                msg = "unknown key"
            elif (inp := err.get("input")) is not None and not isinstance(inp, dict | list):
                msg = f"{msg} (got {inp!r})"
            errors.append((format_loc(err.get("loc", ())), msg))
        raise ConfigError(source, errors) from None


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None


def parse_cars(text: str, source: str = "cars.yaml") -> CarsFile:
    return _validate(CarsFile, _yaml(text, source), source)  # type: ignore[no-any-return]


def parse_limits(text: str, source: str = "limits.yaml") -> LimitsFile:
    return _validate(LimitsFile, _yaml(text, source), source)  # type: ignore[no-any-return]


HouseRow = tuple[datetime, str | None, tuple[float, float, float]]  # (when, node or None = root, L1..L3 A)


def _number(s: str, decimal_comma: bool) -> float:
    s = s.strip()
    if decimal_comma:
        s = s.replace(".", "").replace(",", ".") if "," in s else s
    x = float(s)
    if not math.isfinite(x) or abs(x) > MAX_ABS_A:
        raise ValueError(f"{s!r} is not a current within ±{MAX_ABS_A:g} A")
    return x + 0.0


def parse_house_csv(text: str, tz: ZoneInfo, source: str = "house.csv") -> list[HouseRow]:
    """Rows of a house-load CSV (see the module docstring). Every bad line is named; at most 20."""
    text = text.lstrip("\ufeff")
    first = text.split("\n", 1)[0]
    sep = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise ConfigError(source, [("", "empty file: a header ts,node,l1_a,l2_a,l3_a is needed")]) from None
    need = ["ts", "l1_a", "l2_a", "l3_a"]
    missing = [c for c in need if c not in header]
    if missing:
        raise ConfigError(source, [("line 1", f"header lacks {', '.join(missing)} (got {','.join(header)}); "
                                               f"expected ts,node,l1_a,l2_a,l3_a")])
    col = {c: header.index(c) for c in [*need, "node"] if c in header}
    rows: list[HouseRow] = []
    errors: list[tuple[str, str]] = []
    for lineno, rec in enumerate(reader, start=2):
        if not rec or all(not x.strip() for x in rec):
            continue
        where = f"line {lineno}"
        try:
            if len(rec) < len(header):
                raise ValueError(f"{len(rec)} fields, the header has {len(header)}")
            raw_ts = rec[col["ts"]].strip()
            try:
                ts = datetime.fromisoformat(raw_ts.replace(" ", "T", 1) if "T" not in raw_ts else raw_ts)
            except ValueError:
                raise ValueError(f"ts: {raw_ts!r} is not an ISO 8601 time") from None
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=tz)
            node = rec[col["node"]].strip() if "node" in col else None
            vals = []
            for c in ("l1_a", "l2_a", "l3_a"):
                try:
                    vals.append(_number(rec[col[c]], sep == ";"))
                except ValueError as e:
                    raise ValueError(f"{c}: {e}") from None
            rows.append((ts, node or None, (vals[0], vals[1], vals[2])))
        except ValueError as e:
            errors.append((where, str(e)))
            if len(errors) >= 20:
                errors.append(("", "(more errors not shown)"))
                break
    if errors:
        raise ConfigError(source, errors)
    if not rows:
        raise ConfigError(source, [("", "no data rows")])
    return rows


# -- synthetic profiles ------------------------------------------------------------------------------------------

# Mean household demand per hour of day (W, H0-like winter weekday shape); scaled to the annual energy.
_SHAPE_W = (180, 150, 140, 135, 135, 150, 260, 420, 430, 380, 360, 380,
            420, 400, 360, 350, 380, 480, 650, 700, 640, 560, 420, 280)
_SPLIT = (0.45, 0.30, 0.25)  # base load per phase (a real house is never balanced)
# (name, earliest start "HH:MM", jitter min, probability, phase 0..2 or 3 = all, [(minutes, W), ...])
_APPLIANCES: tuple[tuple[str, str, int, float, int, tuple[tuple[int, float], ...]], ...] = (
    ("kettle", "06:40", 20, 1.0, 0, ((4, 2000.0),)),
    ("hair dryer", "07:05", 20, 0.6, 2, ((8, 1800.0),)),
    ("washing machine", "09:30", 90, 0.5, 2, ((20, 2000.0), (70, 150.0))),
    ("stove", "17:50", 30, 1.0, 0, ((40, 2500.0),)),
    ("oven", "18:05", 30, 0.6, 1, ((15, 2800.0), (35, 1200.0))),
    ("dishwasher", "20:15", 45, 0.7, 1, ((20, 2000.0), (50, 100.0), (10, 1800.0))),
    ("kettle", "21:00", 60, 0.5, 0, ((3, 2000.0),)),
)


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    params: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v:g}" for k, v in sorted(self.params.items())) if self.params else "")


PROFILE_PARAMS = {"household": {"kwh": 4500.0, "pv": 0.0, "heatpump": 0.0, "seed": 1.0},
                  "flat": {"a": 0.0, "l1": math.nan, "l2": math.nan, "l3": math.nan}}


def parse_profile(spec: str) -> Profile:
    """``household[:kwh=4500,pv=0,heatpump=0,seed=1]``, ``flat:a=8`` or ``flat:l1=10,l2=4,l3=2``."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in PROFILE_PARAMS:
        raise ValueError(f"unknown profile {name!r} (known: {', '.join(PROFILE_PARAMS)})")
    params: dict[str, float] = {}
    for part in filter(None, (x.strip() for x in rest.split(","))):
        k, eq, v = part.partition("=")
        k = k.strip()
        if not eq or k not in PROFILE_PARAMS[name]:
            raise ValueError(f"profile {name}: {part!r} is not one of "
                             f"{', '.join(f'{p}=N' for p in PROFILE_PARAMS[name])}")
        try:
            x = float(v)
        except ValueError:
            raise ValueError(f"profile {name}: {k}={v!r} is not a number") from None
        limits = {"kwh": (0, 100_000), "pv": (0, 1000), "heatpump": (0, 100), "seed": (0, 2**31),
                  "a": (-MAX_ABS_A, MAX_ABS_A), "l1": (-MAX_ABS_A, MAX_ABS_A), "l2": (-MAX_ABS_A, MAX_ABS_A),
                  "l3": (-MAX_ABS_A, MAX_ABS_A)}[k]
        if not (math.isfinite(x) and limits[0] <= x <= limits[1]):
            raise ValueError(f"profile {name}: {k}={v} is outside {limits[0]:g}..{limits[1]:g}")
        params[k] = x
    return Profile(name, params)


def synthetic_rows(profile: Profile, first_day: date, days: int, tz: ZoneInfo,
                   voltage: float = 230.0) -> list[HouseRow]:
    """Minute-by-minute rows (only where the value changes) at the grid connection for ``days`` days."""
    prm = {**PROFILE_PARAMS[profile.name], **profile.params}
    rows: list[HouseRow] = []
    last: tuple[float, float, float] | None = None
    if profile.name == "flat":
        a = prm["a"]
        vals = tuple(a if math.isnan(prm[f"l{k + 1}"]) else prm[f"l{k + 1}"] for k in range(3))
        return [(datetime.combine(first_day, time(0), tzinfo=tz), None, vals)]  # type: ignore[list-item]
    scale = prm["kwh"] / 365.0 / (sum(_SHAPE_W) / 1000.0)
    for d in range(days):
        day = first_day + timedelta(days=d)
        rng = random.Random(int(prm["seed"]) * 100_003 + day.toordinal())
        watts = [[0.0] * 1440 for _ in range(3)]
        for minute in range(1440):
            q = minute - minute % 15  # the base load changes every 15 minutes (like a standard load profile)
            h = q / 60.0
            i0 = int(h) % 24
            frac = h - int(h)
            base = round((_SHAPE_W[i0] * (1 - frac) + _SHAPE_W[(i0 + 1) % 24] * frac) * scale / 10) * 10
            for k in range(3):
                watts[k][minute] = base * _SPLIT[k]
        for _name, start, jitter, prob, phase, parts in _APPLIANCES:
            if rng.random() >= prob:
                continue
            t0 = hhmm_time(start)
            m = t0.hour * 60 + t0.minute + rng.randrange(jitter + 1)
            for length, w in parts:
                for mm in range(m, min(m + length, 1440)):
                    for k in (range(3) if phase == 3 else (phase,)):
                        watts[k][mm] += w / (3 if phase == 3 else 1)
                m += length
        hp = prm["heatpump"] * 1000.0
        if hp > 0:
            offset = rng.randrange(45)
            for mm in range(1440):
                if (mm + offset) % 45 < 20:  # on 20 min of every 45
                    for k in range(3):
                        watts[k][mm] += hp / 3
        pv = prm["pv"] * 1000.0
        if pv > 0:
            for mm in range(1440):
                h = (mm - mm % 5) / 60.0  # changes every 5 minutes
                if 8.0 < h < 16.0:
                    prod = round(0.7 * pv * math.sin(math.pi * (h - 8.0) / 8.0) / 50) * 50
                    for k in range(3):
                        watts[k][mm] -= prod / 3
        for mm in range(1440):
            vals = tuple(round(watts[k][mm] / voltage, 2) for k in range(3))
            if vals != last:
                ts = datetime.combine(day, time(mm // 60, mm % 60), tzinfo=tz)
                rows.append((ts, None, vals))
                last = vals
    return rows


# -- the whole scenario ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Scenario:
    """House load rows (``house``), cars and limits; ``label`` says where the house load came from."""

    house: list[HouseRow]
    cars: CarsFile = field(default_factory=CarsFile)
    limits: LimitsFile = field(default_factory=LimitsFile)
    label: str = ""


def default_cars(evses: list[Any], need_kwh: float = 20.0) -> CarsFile:
    """One car per EVSE when no cars file is given: evening arrivals 30 min apart from 17:00, leaving at
    07:00, each wanting ``need_kwh`` at what its EVSE can give."""
    cars = []
    for i, e in enumerate(evses):
        minutes = 17 * 60 + 30 * i
        arrive = f"{(minutes // 60) % 24:02d}:{minutes % 60:02d}"
        cars.append(CarSpec(id=f"car-{e.id}"[:64], evse=e.id, arrive=arrive, depart="07:00", need_kwh=need_kwh,
                            max_current_a=e.max_current_a, phases=e.phases))
    return CarsFile(cars=cars)
