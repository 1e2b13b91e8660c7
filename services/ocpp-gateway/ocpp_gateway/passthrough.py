"""What the gateway forwards unchanged between a wallbox and the backend, and the few fields it maps.

Pure functions and tables, no I/O. They apply when the wallbox and its upstream charge point speak
the same OCPP version (across versions the gateway translates, see :mod:`ocpp_gateway.conv`). The
service README has the table of every field the gateway changes and why; this module is that table
in code:

* Each configured connector of a wallbox is a charge point of its own at the backend, with one
  connector: its connector (1.6) / EVSE (2.0.1) ``1`` there is the wallbox's connector ``n``.
  Connector ``0`` (the whole charge point) stays ``0`` for a wallbox with one configured connector;
  for a wallbox with several it becomes ``n`` (the backend addresses one charge point, not the box).
  An id the upstream charge point does not have is refused (:class:`NoSuchConnector`).
* Everything else passes as it was sent.
"""

from __future__ import annotations

import copy
from typing import Any

# backend -> wallbox calls that are forwarded (same version), with the JSON paths of connector / EVSE ids
DOWN_16: dict[str, tuple[str, ...]] = {
    "RemoteStartTransaction": ("connectorId",),  # chargingProfile: kept by the gateway (see README)
    "RemoteStopTransaction": (),  # transactionId: the wallbox's own id (see README)
    "Reset": (), "ChangeAvailability": ("connectorId",), "UnlockConnector": ("connectorId",),
    "TriggerMessage": ("connectorId",), "GetConfiguration": (), "ChangeConfiguration": (), "DataTransfer": (),
    "ClearCache": (), "GetDiagnostics": (), "UpdateFirmware": (), "GetLocalListVersion": (), "SendLocalList": (),
    "ReserveNow": ("connectorId",), "CancelReservation": (), "GetCompositeSchedule": ("connectorId",),
    "ExtendedTriggerMessage": ("connectorId",), "GetLog": (), "SignedUpdateFirmware": (),
}
DOWN_201: dict[str, tuple[str, ...]] = {
    "RequestStartTransaction": ("evseId",),  # chargingProfile: kept by the gateway (see README)
    "RequestStopTransaction": (), "Reset": ("evseId",), "ChangeAvailability": ("evse.id",),
    "UnlockConnector": ("evseId",), "TriggerMessage": ("evse.id",),
    "GetVariables": ("getVariableData[].component.evse.id",), "SetVariables": ("setVariableData[].component.evse.id",),
    "DataTransfer": (), "ClearCache": (),
    "GetLog": (), "UpdateFirmware": (), "GetLocalListVersion": (), "SendLocalList": (),
    "ReserveNow": ("evseId",), "CancelReservation": (), "GetCompositeSchedule": ("evseId",),
    "GetBaseReport": (), "GetReport": ("componentCriteria",), "GetTransactionStatus": (), "CostUpdated": (),
    "CustomerInformation": (), "SetDisplayMessage": (), "GetDisplayMessages": (), "ClearDisplayMessage": (),
    "SetMonitoringBase": (), "SetMonitoringLevel": (), "SetVariableMonitoring": (), "ClearVariableMonitoring": (),
    "GetMonitoringReport": (), "PublishFirmware": (), "UnpublishFirmware": (),
}
DOWN: dict[str, dict[str, tuple[str, ...]]] = {"1.6": DOWN_16, "2.0.1": DOWN_201}
# ... and the ids in their answers (wallbox -> backend)
ANSWER_UP: dict[str, dict[str, tuple[str, ...]]] = {
    "1.6": {"GetCompositeSchedule": ("connectorId",)},
    "2.0.1": {"GetCompositeSchedule": ("schedule.evseId",),
              "GetVariables": ("getVariableResult[].component.evse.id",),
              "SetVariables": ("setVariableResult[].component.evse.id",)},
}

# wallbox -> backend calls (same version) and the paths of connector / EVSE ids in them
UP_16: dict[str, tuple[str, ...]] = {
    "StatusNotification": ("connectorId",), "StartTransaction": ("connectorId",), "MeterValues": ("connectorId",),
    "StopTransaction": (), "Authorize": (), "DataTransfer": (), "BootNotification": (),
    "DiagnosticsStatusNotification": (), "FirmwareStatusNotification": (), "SecurityEventNotification": (),
    "LogStatusNotification": (), "SignedFirmwareStatusNotification": (),
}
UP_201: dict[str, tuple[str, ...]] = {
    "StatusNotification": ("evseId",), "TransactionEvent": ("evse.id",), "MeterValues": ("evseId",),
    "Authorize": (), "DataTransfer": (), "BootNotification": (), "NotifyEvent": ("eventData[].component.evse.id",),
    "NotifyReport": ("reportData[].component.evse.id",), "SecurityEventNotification": (),
    "LogStatusNotification": (), "FirmwareStatusNotification": (), "PublishFirmwareStatusNotification": (),
    "NotifyMonitoringReport": ("monitor[].component.evse.id",), "NotifyChargingLimit": ("evseId",),
    "ClearedChargingLimit": ("evseId",), "NotifyCustomerInformation": (), "NotifyDisplayMessages": (),
    "ReportChargingProfiles": ("evseId",), "NotifyEVChargingSchedule": ("evseId",),
    "NotifyEVChargingNeeds": ("evseId",), "ReservationStatusUpdate": (), "Get15118EVCertificate": (),
    "GetCertificateStatus": (),
}
UP: dict[str, dict[str, tuple[str, ...]]] = {"1.6": UP_16, "2.0.1": UP_201}

# wallbox -> backend notifications: forwarded when the backend is connected (state, not billing data: not
# queued), the wallbox gets its (empty) answer from the gateway at once
NOTIFY_16 = frozenset({"DiagnosticsStatusNotification", "FirmwareStatusNotification", "SecurityEventNotification",
                       "LogStatusNotification", "SignedFirmwareStatusNotification"})
NOTIFY_201 = frozenset({"NotifyEvent", "NotifyReport", "SecurityEventNotification", "LogStatusNotification",
                        "FirmwareStatusNotification", "PublishFirmwareStatusNotification", "NotifyMonitoringReport",
                        "NotifyChargingLimit", "ClearedChargingLimit", "NotifyCustomerInformation",
                        "NotifyDisplayMessages", "ReportChargingProfiles", "ReservationStatusUpdate"})
NOTIFY: dict[str, frozenset[str]] = {"1.6": NOTIFY_16, "2.0.1": NOTIFY_201}
# wallbox -> backend requests whose answer is the backend's (forwarded when it is connected); the answer
# the gateway gives when it is not
ASK_OFFLINE: dict[str, dict[str, dict[str, Any]]] = {
    "1.6": {"DataTransfer": {"status": "UnknownVendorId"}},
    "2.0.1": {"DataTransfer": {"status": "UnknownVendorId"}, "NotifyEVChargingNeeds": {"status": "Rejected"},
              "NotifyEVChargingSchedule": {"status": "Rejected"},
              "Get15118EVCertificate": {"status": "Failed", "exiResponse": ""},
              "GetCertificateStatus": {"status": "Failed"}},
}

# settings a backend may not change at the wallbox: they belong to its link to the gateway (its password,
# security profile, identity, where it connects); refused by the gateway, not forwarded
PROTECTED_16 = frozenset({"AuthorizationKey", "SecurityProfile"})
PROTECTED_201 = frozenset({("SecurityCtrlr", "BasicAuthPassword"), ("SecurityCtrlr", "SecurityProfile"),
                           ("SecurityCtrlr", "Identity"), ("OCPPCommCtrlr", "NetworkConfigurationPriority"),
                           ("OCPPCommCtrlr", "NetworkProfileConnectionAttempts")})


class NoSuchConnector(ValueError):
    """The backend addressed a connector / EVSE its charge point does not have."""


def _walk(d: Any, path: list[str], fn: Any) -> None:
    """Apply ``fn(value) -> value`` at ``path`` in ``d`` (``name[]`` steps into every list item)."""
    if not path or not isinstance(d, dict):
        return
    step, rest = path[0], path[1:]
    many = step.endswith("[]")
    key = step[:-2] if many else step
    if key not in d:
        if not rest and not many:
            new = fn(None)
            if new is not None:
                d[key] = new
        return
    if many:
        for item in d[key] if isinstance(d[key], list) else []:
            _walk(item, rest, fn)
    elif rest:
        _walk(d[key], rest, fn)
    else:
        new = fn(d[key])
        if new is None:
            del d[key]
        else:
            d[key] = new


def _down_id(n: int, single: bool, optional: bool) -> Any:
    def fn(v: Any) -> Any:
        if v is None:
            return None if single or not optional else n
        if v == 1:
            return n
        if v == 0:
            return 0 if single else n
        raise NoSuchConnector(f"connector {v} does not exist at this charge point (it has connector 1)")
    return fn


def _up_id(n: int) -> Any:
    def fn(v: Any) -> Any:
        if v is None:
            return None
        return 1 if v == n else v
    return fn


def down(version: str, action: str, payload: dict[str, Any], n: int, single: bool) -> dict[str, Any]:
    """A backend call for the wallbox: connector / EVSE ids mapped (raises :class:`NoSuchConnector`)."""
    out = copy.deepcopy(payload)
    for path in DOWN[version].get(action, ()):
        if path == "componentCriteria":
            continue  # a list of criteria, no ids
        steps = path.split(".")
        # only a top-level id or an EVSE object may be filled in for a multi-connector box when absent
        optional = len(steps) == 1 or path in ("evse.id",)
        if path == "evse.id" and "evse" not in out:
            if not single:
                out["evse"] = {"id": n}
            continue
        if "[]" in path:
            _walk(out, steps, _component_down(n))
        else:
            _walk(out, steps, _down_id(n, single, optional))
    return out


def _component_down(n: int) -> Any:
    def fn(v: Any) -> Any:
        return n if v == 1 else v
    return fn


def _map_up(paths: tuple[str, ...], payload: dict[str, Any], n: int) -> dict[str, Any]:
    """``payload`` with the wallbox's connector / EVSE id ``n`` as 1 at ``paths`` (a copy; as it is for 1)."""
    if not paths or n == 1:
        return payload
    out = copy.deepcopy(payload)
    for path in paths:
        _walk(out, path.split("."), _up_id(n))
    return out


def answer_up(version: str, action: str, payload: dict[str, Any], n: int) -> dict[str, Any]:
    """The wallbox's answer to a forwarded call, for the backend: the wallbox's connector ``n`` is 1."""
    return _map_up(ANSWER_UP[version].get(action, ()), payload, n)


def up(version: str, action: str, payload: dict[str, Any], n: int) -> dict[str, Any]:
    """A wallbox call for the backend: the wallbox's connector / EVSE ``n`` is 1 at its upstream charge point."""
    return _map_up(UP[version].get(action, ()), payload, n)
