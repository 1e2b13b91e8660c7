"""docker-compose.yml and the Dockerfiles, checked without a Docker engine: every build context,
Dockerfile, file copied, entry point module, volume and environment variable they name exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
CODE = "\n".join(p.read_text() for p in [*ROOT.glob("shared/chargegate/**/*.py"), *ROOT.glob("services/*/*/**/*.py")])


def module_exists(mod: str) -> bool:
    parts = mod.split(".")
    for base in [ROOT / "shared", *(ROOT / "services").glob("*")]:
        p = base.joinpath(*parts)
        if (p / "__main__.py").exists() or p.with_suffix(".py").exists():
            return True
    return False


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_every_repo_service_has_a_container() -> None:
    for pyproject in ROOT.glob("services/*/pyproject.toml"):
        assert pyproject.parent.name in SERVICES, f"services/{pyproject.parent.name} has no compose entry"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_definition(name: str) -> None:
    svc = SERVICES[name]
    assert "image" in svc or "build" in svc
    if name != "broker-init":
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure")
    for dep, cond in (svc.get("depends_on") or {}).items():
        assert dep in SERVICES
        assert cond["condition"] in ("service_healthy", "service_completed_successfully", "service_started")
        if cond["condition"] == "service_healthy":
            assert "healthcheck" in SERVICES[dep], f"{dep} has no healthcheck"
    for vol in svc.get("volumes", []):
        # a source may be ${VARIABLE:-default} (the test's own folders); the default is what users get
        vol = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", vol)
        src = vol.split(":")[0]
        if src.startswith((".", "/")):
            assert (ROOT / src).exists(), f"{name}: bind mount source {src} missing"
        else:
            assert src in COMPOSE.get("volumes", {}), f"{name}: named volume {src} not declared"
    for var in (svc.get("environment") or {}):
        assert var in CODE, f"{name}: environment variable {var} is not read by any code"
    hc = svc.get("healthcheck", {}).get("test")
    if hc and hc[0] == "CMD" and hc[1] == "python":
        assert module_exists(hc[hc.index("-m") + 1])


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items() if "build" in s))
def test_build_and_dockerfile(name: str) -> None:
    build = SERVICES[name]["build"]
    ctx = ROOT / build["context"]
    assert ctx.is_dir()
    dockerfile = ctx / build.get("dockerfile", "Dockerfile")
    assert dockerfile.exists(), f"{dockerfile} missing"
    ins = dockerfile_instructions(dockerfile)
    # the base image is a build argument (python:3.11-slim by default; docker-compose.local.yml sets a local one)
    assert ins[0][0] == "ARG" and re.fullmatch(r"BASE_IMAGE=python:3\.11\S*", ins[0][1]), ins[0]
    assert ins[1] == ("FROM", "${BASE_IMAGE}"), ins[1]
    for op, rest in ins:
        if op in ("COPY", "ADD"):
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            for src in args[:-1]:
                if src.startswith("build/wheelhouse"):  # made on the host by scripts/build-wheelhouse.sh
                    assert (ROOT / "scripts" / "build-wheelhouse.sh").exists()
                    continue
                assert (ctx / src).exists(), f"{dockerfile}: COPY source {src} missing"
    users = [rest for op, rest in ins if op == "USER"]
    entry = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert entry, f"{dockerfile} has no ENTRYPOINT"
    argv = yaml.safe_load(entry[-1])
    if argv[0] == "python":
        assert module_exists(argv[argv.index("-m") + 1]), argv
        assert users, f"{dockerfile}: a service container must not run as root"
    assert "requirements.lock" in dockerfile.read_text(), "images must install the pinned versions"
