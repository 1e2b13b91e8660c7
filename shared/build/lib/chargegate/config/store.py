"""The configuration file as a versioned store: validated, written atomically, history kept.

Every change goes through :meth:`ConfigStore.replace` (a whole document) or :meth:`patch`
(an RFC 7386 JSON merge patch), or the helpers that add, change and remove EVSEs and meters.
Each validates the new document with the same models as ``chargegate config check``; a document
that fails validation changes nothing and the :class:`ConfigError` says why. A valid one is
written to a temporary file, fsynced and renamed over the configuration (readers never see half
a file), and a copy is kept in the history (the last ``keep`` versions), from which
:meth:`rollback` restores any version.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from chargegate.config import Config, ConfigError, loads, resolve_paths, validate_data

_VERSION_FILE = re.compile(r"^(\d{8}T\d{6}\d{6}Z)-([0-9a-f]{12})\.yaml$")


@dataclass(frozen=True)
class Version:
    version: str  # the configuration digest
    saved: str  # UTC timestamp of the save
    path: Path

    def as_dict(self) -> dict[str, str]:
        return {"version": self.version, "saved": self.saved}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, ``null`` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically. The configuration holds tokens and passwords: the file, its
    temporary file and its copies are 0600 whatever the umask."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


class ConfigStore:
    """The configuration file at ``path`` with its history in ``history_dir``."""

    def __init__(self, path: Path, history_dir: Path | None = None, keep: int = 20) -> None:
        self.path = Path(path)
        self.history_dir = Path(history_dir) if history_dir else self.path.parent / ".chargegate-history"
        self.keep = keep
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------
    def text(self) -> str:
        return self.path.read_text()

    def data(self) -> dict[str, Any]:
        data = yaml.safe_load(self.text())
        if not isinstance(data, dict):
            raise ConfigError(str(self.path), [("", "the current configuration is not a mapping")])
        return data

    def current(self) -> Config:
        return self.parse(self.text(), str(self.path))

    def parse(self, text: str, source: str = "new configuration") -> Config:
        """Validate ``text`` as this file would be loaded (paths resolved: the digest is the version
        the services report after loading it)."""
        return resolve_paths(loads(text, source), self.path)

    def versions(self) -> list[Version]:
        if not self.history_dir.exists():
            return []
        out = []
        for f in sorted(self.history_dir.iterdir()):
            m = _VERSION_FILE.match(f.name)
            if m:
                out.append(Version(m.group(2), m.group(1), f))
        return out

    # -- changing ----------------------------------------------------------------------------
    def replace(self, text: str, source: str = "new configuration") -> Config:
        """Validate ``text`` and make it the configuration. Raises ConfigError, changing nothing."""
        cfg = self.parse(text, source)
        with self._lock:
            if not self.versions() and self.path.exists():
                try:  # keep the original, so that a rollback can return to it
                    self._remember(self.path.read_text(), self.current().digest())
                except ConfigError:
                    pass
            atomic_write(self.path, text)
            self._remember(text, cfg.digest())
        return cfg

    def replace_data(self, data: dict[str, Any], source: str = "new configuration") -> Config:
        validate_data(data, source)  # fail before serialising
        return self.replace(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), source)

    def patch(self, patch: dict[str, Any]) -> Config:
        return self.replace_data(merge_patch(self.data(), patch), "patched configuration")

    def upsert_item(self, section: str, item: dict[str, Any]) -> Config:
        """Add or replace the item with ``item['id']`` in ``evses`` or ``meters``."""
        if section not in ("evses", "meters"):
            raise ValueError(f"unknown section {section}")
        ident = item.get("id")
        if not isinstance(ident, str):
            raise ConfigError(section, [(f"{section}[].id", "an id is required")])
        data = self.data()
        items = [x for x in data.get(section) or [] if isinstance(x, dict)]
        for i, x in enumerate(items):
            if x.get("id") == ident:
                items[i] = item
                break
        else:
            items.append(item)
        data[section] = items
        return self.replace_data(data, f"{section}/{ident}")

    def remove_item(self, section: str, ident: str) -> Config:
        data = self.data()
        items = [x for x in data.get(section) or [] if isinstance(x, dict)]
        kept = [x for x in items if x.get("id") != ident]
        if len(kept) == len(items):
            raise KeyError(ident)
        data[section] = kept
        return self.replace_data(data, f"{section}/{ident}")

    def rollback(self, version: str) -> Config:
        for v in reversed(self.versions()):
            if v.version == version:
                return self.replace(v.path.read_text(), f"history version {version}")
        raise KeyError(version)

    def _remember(self, text: str, digest: str) -> None:
        self.history_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.history_dir, 0o700)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        atomic_write(self.history_dir / f"{stamp}-{digest}.yaml", text)
        versions = self.versions()
        for old in versions[: max(0, len(versions) - self.keep)]:
            old.path.unlink(missing_ok=True)


class AuditLog:
    """Append-only audit log (JSON lines, fsynced): who, what, when, the result."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def record(self, who: str, role: str, action: str, target: str, result: str, detail: Any = None) -> dict[str, Any]:
        entry = {"ts": datetime.now(UTC).isoformat(), "who": who, "role": role, "action": action,
                 "target": target, "result": result, "detail": detail}
        line = json.dumps(entry, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.fchmod(fd, 0o600)  # who did what: 0600 whatever the umask, also a file an older version left wider
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry

    def read(self, limit: int = 200) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()[-limit:]
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line after a crash is skipped, not fatal
        return out
