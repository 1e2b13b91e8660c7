"""The history service: where the record is kept, how long, and the prices sessions are costed at."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from chargegate.config.base import Strict


class Prices(Strict):
    """Energy prices per tariff level in ct/kWh (gross, as on the bill). A level without a price takes the
    tariff period's own announced price when there is one, else ``default_ct_per_kwh``."""

    low: float | None = Field(default=None, ge=-1000, le=1000)
    normal: float | None = Field(default=None, ge=-1000, le=1000)
    high: float | None = Field(default=None, ge=-1000, le=1000)
    default_ct_per_kwh: float | None = Field(
        default=None, ge=-1000, le=1000, description="no tariff known, or a level without a price")
    currency: str = Field(default="EUR", min_length=1, max_length=8)


class Retention(Strict):
    """How long each kind of record is kept (days; null = forever)."""

    sessions_days: float | None = Field(default=None, ge=1, description="default: forever")
    controls_days: float | None = Field(
        default=731, ge=1, description="control actions (grid-operator limits, failsafes, link outages); keep "
                                       "them at least two years (§14a documentation)")
    series_days: float | None = Field(default=90, ge=0.01, description="the 1-minute time series")


class History(Strict):
    db_file: Path | None = Field(default=None, description="SQLite database; default state_dir/history/history.db")
    retention: Retention = Field(default_factory=Retention)
    max_db_mb: float = Field(
        default=512, ge=1, le=1_000_000,
        description="disk use bound: above it the oldest time-series minutes are deleted first (sessions and "
                    "control actions are never deleted for space)")
    series_interval_s: float = Field(default=60, ge=1, le=3600, description="time-series resolution")
    prices: Prices = Field(default_factory=Prices)
    csv_style: Literal["de", "intl"] = Field(
        default="de", description="de: ';' separated, decimal comma (German-locale spreadsheets); intl: ',' and '.'")

    def db_path(self, state_dir: Path) -> Path:
        return self.db_file if self.db_file is not None else state_dir / "history" / "history.db"
