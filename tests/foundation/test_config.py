"""Configuration: validation errors name the file, the path in the document and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chargegate import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]
BASE = """
circuits:
  - id: grid
    fuse_a: 35
    children: [{id: garage, fuse_a: 32}]
evses:
  - {id: a, circuit: garage, modbus: {profile: alfen-eve, host: 10.0.0.1}}
  - {id: b, circuit: garage, modbus: {profile: alfen-eve, host: 10.0.0.2}}
  - {id: c, circuit: garage, max_current_a: 16, modbus: {profile: alfen-eve, host: 10.0.0.3}}
"""


def errors_of(text: str) -> list[tuple[str, str]]:
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.loads(text, "test.yaml")
    return ei.value.errors


def test_example_configurations_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for f in ("config.example.yaml", "config/chargegate.yaml"):
        cfg = cfgmod.load(ROOT / f)
        assert cfg.root_circuit.id == "grid"


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (("max_current_a: 16", "max_current_a: 100"), "evses[2].max_current_a", "less than or equal to 80"),
        (("max_current_a: 16", "max_current_a: lots"), "evses[2].max_current_a", "valid number"),
        # numbers are strict: YAML true is not 1 A, a quoted "16" is not a number, .nan/.inf are refused
        (("max_current_a: 16", "max_current_a: true"), "evses[2].max_current_a", "not a boolean"),
        (("max_current_a: 16", "max_current_a: '16'"), "evses[2].max_current_a", "not a string"),
        (("fuse_a: 32", "fuse_a: .nan"), "circuits[0].children[0].fuse_a", "finite number"),
        (("fuse_a: 32", "fuse_a: .inf"), "circuits[0].children[0].fuse_a", "finite number"),
        (("max_current_a: 16", "max_amps: 16"), "evses[2].max_amps", "unknown key"),
        (("circuit: garage, max", "circuit: attic, max"), "evses[2].circuit",
         "unknown circuit 'attic'; circuits: grid, garage"),
        (("fuse_a: 32", "fuse_a: -1"), "circuits[0].children[0].fuse_a", "greater than 0"),
        (("{id: b,", "{id: a,"), "evses[1].id", "evse id 'a' is used twice (also at evses[0].id)"),
        (("children: [{id: garage, fuse_a: 32}]", "children: [{id: garage, fuse_a: 32}, {id: garage, fuse_a: 20}]"),
         "circuits[0].children[1].id", "circuit id 'garage' is used twice"),
        (("fuse_a: 35", "fuse_a: 35\n    meter: gm"), "circuits[0].meter", "unknown meter 'gm'"),
        (("host: 10.0.0.3}", "}"), "evses[2].modbus", "needs host"),
        (("id: a,", "id: 'a b',"), "evses[0].id", "pattern"),
    ],
)
def test_error_names_path_and_problem(change: tuple[str, str], path: str, words: str) -> None:
    errs = errors_of(BASE.replace(*change, 1))
    assert any(p == path and words in m for p, m in errs), errs


def test_strict_numbers_in_a_charging_rule_name_the_field() -> None:
    """Charging rules are a discriminated union (by ``type``): checked at model level, the message names
    the field."""
    doc = BASE + "\ncontroller:\n  rules:\n    - {id: r1, type: solar, start_threshold_w: true}\n"
    errs = errors_of(doc)
    assert any("start_threshold_w" in p + m and "not a boolean" in m for p, m in errs), errs


def test_error_message_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(BASE.replace("max_current_a: 16", "max_current_a: 100"))
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(f)
    assert str(ei.value).startswith(f"{f}: evses[2].max_current_a:")


def test_yaml_syntax_error_has_line() -> None:
    errs = errors_of("circuits: [\n  - id: x\n")
    assert "line" in errs[0][0] and "not valid YAML" in errs[0][1]


@pytest.mark.parametrize("doc", ["", "- a list", "42"])
def test_document_must_be_a_mapping(doc: str) -> None:
    assert errors_of(doc)


def test_missing_file() -> None:
    with pytest.raises(cfgmod.ConfigError, match="cannot read"):
        cfgmod.load("/nonexistent/chargegate.yaml")


def test_secrets_from_env_and_file_and_never_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cr3t-from-file\n")
    monkeypatch.setenv("CG_TEST_SECRET", "s3cr3t-from-env")
    text = BASE + f"""
broker:
  accounts:
    observer: {{env: CG_TEST_SECRET}}
    admin: {{file: {pw}}}
    sim: inline-s3cr3t
"""
    cfg = cfgmod.loads(text)
    assert cfg.broker.accounts["observer"].reveal() == "s3cr3t-from-env"
    assert cfg.broker.accounts["admin"].reveal() == "s3cr3t-from-file"
    assert cfg.broker.accounts["sim"].reveal() == "inline-s3cr3t"
    dumped = repr(cfg) + str(cfg.model_dump()) + cfg.model_dump_json()
    for s in ("s3cr3t-from-env", "s3cr3t-from-file", "inline-s3cr3t"):
        assert s not in dumped
    # a bad secret does not echo its value in the error
    errs = errors_of(BASE + "broker: {accounts: {observer: {value: 'hunter2', env: X}}}")
    assert "hunter2" not in str(errs)
    monkeypatch.delenv("CG_TEST_SECRET")
    with pytest.raises(LookupError, match="CG_TEST_SECRET"):
        cfg.broker.accounts["observer"].reveal()


def test_digest_is_stable_and_changes_with_content() -> None:
    a = cfgmod.loads(BASE)
    b = cfgmod.loads(BASE)
    c = cfgmod.loads(BASE.replace("max_current_a: 16", "max_current_a: 15"))
    assert a.digest() == b.digest() != c.digest()


def test_cli_config_check(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("max_current_a: 16", "max_current_a: 100"))
    cli = [sys.executable, "-m", "chargegate.cli", "config", "check"]
    r = subprocess.run([*cli, str(good)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("ok")
    r = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"{bad}: evses[2].max_current_a: Input should be less than or equal to 80 (got 100)" in r.stderr


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ("ocpp:\n  local: {meter_values_interval_s: -1}\n", "ocpp.local.meter_values_interval_s",
         "greater than or equal to 0"),
        ("ocpp:\n  local: {meter_values_interval_s: often}\n", "ocpp.local.meter_values_interval_s", "valid number"),
        ("controller: {ev_current_max_age_s: 0}\n", "controller.ev_current_max_age_s", "greater than or equal to 1"),
        ("controller: {ev_current_fresh_s: 120}\n", "controller.ev_current_fresh_s", "less than or equal to 60"),
    ],
)
def test_measurement_age_settings_are_checked(extra: str, path: str, words: str) -> None:
    errs = errors_of(BASE + extra)
    assert any(p == path and words in m for p, m in errs), errs


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ("controller:\n  rules:\n    - {id: night, type: tariff, evses: [a], charge_in: [low]}\n"
         "    - {id: night, type: tariff, evses: [b], charge_in: [low]}\n",
         "controller.rules[1].id", "rule id 'night' is used twice (also at controller.rules[0].id)"),
        ("web:\n  users: [{name: anna, password: x, role: admin}, {name: anna, password: y, role: viewer}]\n",
         "web.users[1].name", "web user name 'anna' is used twice (also at web.users[0].name)"),
        ("admin:\n  tokens: [{name: ops, token: abcdefghijklmnop, role: viewer},\n"
         "           {name: ops, token: qrstuvwxyz012345, role: viewer}]\n",
         "admin.tokens[1].name", "'ops' is used twice (also at admin.tokens[0].name)"),
    ],
)
def test_a_duplicate_name_names_both_places(extra: str, path: str, words: str) -> None:
    """Not "(document): ... must be unique": the path of the second one, the value, and where the first is."""
    errs = errors_of(BASE + extra)
    assert any(p == path and words in m for p, m in errs), errs
