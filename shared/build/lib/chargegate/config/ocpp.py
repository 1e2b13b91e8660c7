"""OCPP gateway settings: the local central system and the supplier's backend."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from chargegate.config.base import Port, Secret, Strict


class OcppLocalServer(Strict):
    enabled: bool = Field(default=True, description="run the local central system for OCPP wallboxes")
    host: str = "0.0.0.0"
    port: Port = 19520
    tls: Literal["off", "on"] = "off"
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = Field(default=None, description="require client certificates (profile 3)")
    require_password: bool = Field(default=False, description="HTTP Basic auth (security profiles 1 and 2)")
    free_charging: bool = Field(default=True, description="accept every idTag; otherwise only rfid_tags")
    rfid_tags: list[str] = Field(default_factory=list)
    heartbeat_interval_s: int = Field(default=300, ge=10, le=86400)
    max_messages_per_s: float = Field(default=20.0, gt=0, description="per charge point; beyond: rejected")
    check_client_cn: bool = Field(default=True,
                                  description="profile 3: the client certificate's CN must be the charge box id")
    call_timeout_s: float = Field(default=30.0, gt=0, le=300, description="wait for a wallbox's answer")
    meter_values_interval_s: float = Field(
        default=10.0, ge=0, le=3600,
        description="ask every wallbox for MeterValues with its phase currents this often (whole seconds; "
                    "1.6 MeterValueSampleInterval, 2.0.1 SampledDataCtrlr.TxUpdatedInterval) and trigger them "
                    "when they are late: the load controller subtracts these currents from the grid meter. "
                    "0 leaves the wallboxes' own settings and triggers nothing")


class OcppBackend(Strict):
    enabled: bool = False
    url: str | None = Field(default=None, description="ws(s)://backend/ocpp ; the charge box id is appended")
    version: Literal["1.6", "2.0.1"] = "1.6"
    via_smgw: bool = Field(default=False, description="connect through smgw-link's CLS channel")
    smgw_endpoint: str | None = Field(default=None, description="name of the smgw endpoint to use")
    password: Secret | None = Field(default=None, description="default Basic auth password")
    ca_file: Path | None = None
    meter_values_interval_s: float = Field(default=60, ge=0.2, le=3600)
    heartbeat_interval_s: int = Field(default=300, ge=10, le=86400)
    vendor: str = "chargegate"
    model: str = "chargegate-gateway"
    id_tag: str = Field(default="chargegate", min_length=1, max_length=20,
                        description="idTag for sessions of Modbus EVSEs without evse.id_tag")
    call_timeout_s: float = Field(default=30.0, gt=0, le=300, description="wait for the backend's answer")
    reconnect_min_s: float = Field(default=1.0, gt=0, le=600)
    reconnect_max_s: float = Field(default=60.0, gt=0, le=3600)


class OcppQueue(Strict):
    path: Path | None = Field(default=None, description="SQLite file; default state_dir/ocpp-queue.sqlite")
    max_messages: int = Field(default=100_000, ge=10)
    retry_interval_s: float = Field(default=5.0, gt=0)


class Ocpp(Strict):
    local: OcppLocalServer = Field(default_factory=OcppLocalServer)
    backend: OcppBackend = Field(default_factory=OcppBackend)
    queue: OcppQueue = Field(default_factory=OcppQueue)
