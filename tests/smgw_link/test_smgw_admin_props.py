"""Properties of the admin API's document handling: a document read through the API never shows an
inline secret, and sending it back unchanged changes nothing; a merge patch that leaves the document
invalid never reaches the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chargegate.config import ConfigError
from chargegate.config.store import ConfigStore, merge_patch
from smgw_link.admin import confdoc

SECRET = st.text(min_size=1, max_size=12).map(lambda s: "S3CR3T-" + s)
secret_value = st.one_of(SECRET, st.fixed_dictionaries({"value": SECRET}),
                         st.fixed_dictionaries({"env": st.sampled_from(["CG_X", "CG_Y"])}))
plain = st.one_of(st.integers(-5, 5), st.booleans(), st.text(max_size=8).filter(lambda s: "S3CR3T" not in s))
KEYS = st.sampled_from(["site", "evses", "upstream", "name", "id", "ocpp", "backend", "port", "misc"])


def documents() -> st.SearchStrategy[Any]:
    leaf = st.one_of(plain, st.fixed_dictionaries({"password": secret_value}),
                     st.fixed_dictionaries({"token": secret_value, "name": st.sampled_from(["a", "b"])}),
                     st.fixed_dictionaries({"tokens": st.lists(secret_value, max_size=3)}),
                     st.fixed_dictionaries({"accounts": st.dictionaries(st.sampled_from(["smgw-link", "admin"]),
                                                                        secret_value, max_size=2)}))
    return st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(KEYS, inner, max_size=3)), max_leaves=12)


def _secrets(x: Any) -> list[str]:
    if isinstance(x, str):
        return [x] if x.startswith("S3CR3T-") else []
    if isinstance(x, dict):
        return [s for v in x.values() for s in _secrets(v)]
    if isinstance(x, list):
        return [s for v in x for s in _secrets(v)]
    return []


@settings(max_examples=300, deadline=None)
@given(documents())
def test_redacted_documents_show_no_secret_and_round_trip(doc: Any) -> None:
    shown = confdoc.redact(doc)
    assert _secrets(shown) == []
    assert confdoc.unredact(shown, doc) == doc
    assert confdoc.contains_placeholder(confdoc.unredact(shown, doc)) == [] or _has_literal_placeholder(doc)


def _has_literal_placeholder(doc: Any) -> bool:
    return confdoc.REDACTED in str(doc)


VALID = """
circuits:
  - id: grid
    fuse_a: 35
evses:
  - id: wb1
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
"""
patches = st.recursive(
    st.one_of(st.none(), st.integers(-100, 100), st.text(max_size=5), st.booleans()),
    lambda inner: st.dictionaries(st.sampled_from(["circuits", "evses", "fuse_a", "site", "name", "controller",
                                                   "cycle_s", "id", "admin", "meters"]), inner, max_size=3),
    max_leaves=8).filter(lambda x: isinstance(x, dict))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patches)
def test_an_invalid_patch_never_reaches_the_file(tmp_path: Path, patch: dict[str, Any]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(VALID)
    store = ConfigStore(path, keep=3)
    before = path.read_bytes()
    try:
        store.patch(patch)
    except ConfigError:
        assert path.read_bytes() == before
        return
    # accepted: the file is what the merge patch made of the document, and it loads
    assert yaml.safe_load(path.read_text()) == merge_patch(yaml.safe_load(VALID), patch)
    store.current()
