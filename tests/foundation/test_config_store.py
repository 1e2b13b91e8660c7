"""Versioned configuration store and audit log."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chargegate.config import ConfigError
from chargegate.config.store import AuditLog, ConfigStore, merge_patch
from conftest import MINIMAL_CONFIG


@pytest.fixture
def store(tmp_path: Path) -> ConfigStore:
    path = tmp_path / "chargegate.yaml"
    path.write_text(MINIMAL_CONFIG)
    return ConfigStore(path, keep=3)


def test_invalid_change_changes_nothing(store: ConfigStore) -> None:
    before = store.text()
    with pytest.raises(ConfigError) as ei:
        store.patch({"evses": [{"id": "x", "circuit": "nowhere", "modbus": {"profile": "p", "host": "h"}}]})
    assert "unknown circuit 'nowhere'" in str(ei.value)
    with pytest.raises(ConfigError):
        store.replace("circuits: []")
    assert store.text() == before
    assert store.versions() == []
    assert [f.name for f in store.path.parent.iterdir() if f.name.startswith(".chargegate.yaml")] == []


def test_patch_add_remove_and_rollback(store: ConfigStore) -> None:
    original = store.current().digest()
    cfg = store.patch({"controller": {"reserve_a": 2}})
    assert cfg.controller.reserve_a == 2
    cfg = store.upsert_item("evses", {"id": "wb3", "circuit": "garage", "max_current_a": 20,
                                      "modbus": {"profile": "alfen-eve", "host": "127.0.0.1", "port": 1600}})
    assert [e.id for e in cfg.evses] == ["wb1", "wb2", "wb3"]
    cfg = store.upsert_item("evses", {"id": "wb3", "circuit": "garage", "max_current_a": 10,
                                      "modbus": {"profile": "alfen-eve", "host": "127.0.0.1", "port": 1600}})
    assert cfg.evse("wb3").max_current_a == 10
    cfg = store.remove_item("evses", "wb2")
    assert [e.id for e in cfg.evses] == ["wb1", "wb3"]
    with pytest.raises(KeyError):
        store.remove_item("evses", "nope")
    versions = store.versions()
    assert len(versions) == 3  # keep=3: the oldest were pruned
    assert versions[-1].version == store.current().digest()
    rolled = store.rollback(versions[0].version)
    assert rolled.digest() == versions[0].version
    with pytest.raises(KeyError):
        store.rollback(original + "x")


def test_first_change_keeps_the_original(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL_CONFIG)
    s = ConfigStore(path)
    original = s.current().digest()
    s.patch({"controller": {"reserve_a": 3}})
    assert s.rollback(original).digest() == original


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=3)),
                    lambda c: st.dictionaries(st.text(max_size=3), c, max_size=4), max_leaves=10),
       st.dictionaries(st.text(max_size=3), st.integers(), max_size=4))
def test_merge_patch_properties(patch: object, target: dict[str, int]) -> None:
    out = merge_patch(target, patch)
    if isinstance(patch, dict):
        for k, v in patch.items():
            if v is None:
                assert k not in out
            elif not isinstance(v, dict):
                assert out[k] == v
        for k, v in target.items():
            if k not in patch:
                assert out[k] == v
    else:
        assert out == patch


def test_audit_log(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record("dso", "operator", "set_limit", "grid/limit", "ok", {"power_w": 4200})
    log.record("installer", "admin", "replace_config", "config", "rejected", "evses[0].circuit: unknown")
    with open(log.path, "a") as f:
        f.write('{"torn')  # a crash in the middle of a line
    entries = log.read()
    assert [e["action"] for e in entries] == ["set_limit", "replace_config"]
    assert entries[0]["who"] == "dso" and entries[1]["result"] == "rejected"
    assert (log.path.stat().st_mode & 0o777) == 0o600


def test_written_configuration_and_copies_are_0600(tmp_path: Path) -> None:
    """The configuration holds tokens and passwords: after a change the file, every copy in the history
    folder and the folder itself are readable by the owner only, whatever the umask."""
    import os
    import stat

    path = tmp_path / "chargegate.yaml"
    path.write_text(MINIMAL_CONFIG)
    os.chmod(path, 0o600)
    old = os.umask(0o022)
    try:
        store = ConfigStore(path, keep=3)
        store.patch({"controller": {"reserve_a": 2}})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    copies = list(store.history_dir.iterdir())
    assert copies and all(stat.S_IMODE(c.stat().st_mode) == 0o600 for c in copies), copies
    assert stat.S_IMODE(store.history_dir.stat().st_mode) == 0o700
    assert not [c for c in tmp_path.iterdir() if ".tmp-" in c.name]
