"""The configuration document as the API shows and takes it: secrets redacted on the way out,
and put back on the way in where a client returns the placeholder unchanged."""

from __future__ import annotations

import copy
from typing import Any

from chargegate.config import Config

REDACTED = "<redacted>"
_SECRET_KEYS = {"password", "token", "tokens", "accounts"}


def _redact_secret(v: Any) -> Any:
    """A Secret as written in YAML: a plain string, ``{value: ...}``, ``{env: X}``, ``{file: Y}``."""
    if isinstance(v, str):
        return REDACTED
    if isinstance(v, dict):
        return {k: (REDACTED if k == "value" else x) for k, x in v.items()}
    return v


def _secret_shaped(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, dict) and bool(v) and set(v) <= {"value", "env", "file"})


def redact(data: Any, key: str | None = None) -> Any:
    """A copy of ``data`` with every inline secret replaced by :data:`REDACTED` (environment
    variable and file references stay: they are not secret)."""
    if key in _SECRET_KEYS:
        if key == "accounts" and isinstance(data, dict):
            return {k: _redact_secret(v) for k, v in data.items()}
        if isinstance(data, list):  # a list of secrets, or of items holding one (admin.tokens)
            return [_redact_secret(x) if _secret_shaped(x) else redact(x) for x in data]
        if _secret_shaped(data):
            return _redact_secret(data)
    if isinstance(data, dict):
        return {k: redact(v, k) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(x) for x in data]
    return data


def _identity(item: Any) -> Any:
    if isinstance(item, dict):
        for k in ("id", "name"):
            if isinstance(item.get(k), str):
                return (k, item[k])
    return None


def unredact(new: Any, current: Any) -> Any:
    """``new`` with every :data:`REDACTED` placeholder replaced by the value at the same place in
    ``current`` (list items are matched by their ``id`` or ``name``, else by position). A
    placeholder with nothing behind it stays, and fails validation as the secret it claims to be."""
    if isinstance(new, str):
        return copy.deepcopy(current) if new == REDACTED and current is not None else new
    if isinstance(new, dict):
        cur = current if isinstance(current, dict) else {}
        return {k: unredact(v, cur.get(k)) for k, v in new.items()}
    if isinstance(new, list):
        cur_list = current if isinstance(current, list) else []
        cur_ids = [_identity(x) for x in cur_list]
        new_ids = [_identity(x) for x in new]
        # by identity where it names one item on each side, by position where items have none
        by_id = {ident: x for ident, x in zip(cur_ids, cur_list, strict=True)
                 if ident is not None and cur_ids.count(ident) == 1}
        out = []
        for i, x in enumerate(new):
            ident = new_ids[i]
            if ident is None or new_ids.count(ident) > 1 or cur_ids.count(ident) > 1:
                match = cur_list[i] if i < len(cur_list) else None  # plain secrets (tokens) by position
            else:
                match = by_id.get(ident)  # a new item gets no other item's secret
            out.append(unredact(x, match))
        return out
    return new


def contains_placeholder(data: Any) -> list[str]:
    """Paths of placeholders left over (a secret that was never there)."""
    out: list[str] = []

    def walk(x: Any, path: str) -> None:
        if isinstance(x, str) and x == REDACTED:
            out.append(path or "(document)")
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    walk(data, "")
    return out


def lockout(cfg: Config) -> str | None:
    """Why ``cfg`` would lock every administrator out of this API (None when it would not)."""
    a = cfg.admin
    if not a.enabled:
        return "admin.enabled would be false: the admin API would stop"
    if not any(t.role == "admin" for t in a.tokens) and not any(c.role == "admin" for c in a.clients):
        return "no admin token or admin client certificate would be left"
    return None
