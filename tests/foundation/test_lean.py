"""chargegate.lean: a service process's malloc arenas are capped and what it freed goes back to the system
(glibc; bench/footprint)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from chargegate import lean, runtime

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None

ARENAS = """
import ctypes, os, sys, threading
if sys.argv[1] == "service":
    from chargegate.lean import service_process
    service_process()
keep = []
gate = threading.Barrier(8)
def work():
    gate.wait()  # all eight alive at once: none can take over an arena another one left
    keep.append([bytes(1000 + i) for i in range(200)])  # above pymalloc's 512 bytes: malloc, in this thread's arena
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
os.dup2(1, 2)
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena n:" block per arena, on stderr
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
@pytest.mark.parametrize(("mode", "env", "most"), [("service", {}, 2), ("plain", {}, 99),
                                                   ("service", {"MALLOC_ARENA_MAX": "3"}, 3)])
def test_arenas_are_capped_in_a_service_process(mode: str, env: dict[str, str], most: int) -> None:
    e = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    out = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, env=e, timeout=60,
                         check=True)
    arenas = sum(line.startswith("Arena ") for line in out.stdout.splitlines())
    assert 1 <= arenas <= most
    if mode == "plain":
        assert arenas > 2  # without the cap: one per thread (what the cap is for)


TRIM = """
import json, sys
from chargegate import lean
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
blocks = [bytes(1000 + i % 7) for i in range(30000)]  # ~30 MB of malloc'ed blocks in the main heap
pin = bytes(1000)  # after them: the top of the heap stays in use, free() alone cannot shrink it
before = rss()
del blocks
freed = rss()
released = lean.release_memory()
print(json.dumps({"before": before, "freed": freed, "after": rss(), "released": released}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
def test_release_memory_hands_freed_pages_back() -> None:
    out = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, check=True, timeout=60)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["released"] is True
    assert r["freed"] - r["after"] > 20, r  # the freed blocks' pages were resident until the trim


def test_limit_arenas_leaves_an_environment_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert lean.limit_arenas() is False


async def test_the_runtime_releases_memory_after_start_up_and_then_periodically(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(runtime, "RELEASE_FIRST_S", 0.0)
    monkeypatch.setattr(runtime, "RELEASE_EVERY_S", 0.01)
    monkeypatch.setattr(runtime, "release_memory", lambda: calls.append(0.0) or True)

    class Log:
        def debug(self, *_: Any, **__: Any) -> None:
            pass

    task = asyncio.create_task(runtime._release_memory_now_and_then(Log()))
    await asyncio.sleep(0.1)
    task.cancel()
    assert len(calls) >= 3


PLUGINS = """
import json, sys
from chargegate.lean import service_process
service_process()
import runpy
runpy.run_module(sys.argv[1], run_name="probe", alter_sys=True)
from pydantic import BaseModel, ValidationError
from pydantic.plugin._loader import get_plugins
class M(BaseModel):
    a: int
ok = M.model_validate({"a": 1}).a == 1
try:
    M.model_validate({"a": "x"})
    refused = False
except ValidationError:
    refused = True
from chargegate import config, payloads, preflight  # preflight: run_service's check of the secrets and files
print(json.dumps({"plugins": list(get_plugins()), "ok": ok, "refused": refused,
                  "metadata": "importlib.metadata" in sys.modules}))
"""


@pytest.mark.parametrize("module", ["evse_poller", "load_controller", "smgw_link", "history"])
def test_a_service_process_does_not_look_for_pydantic_plugins(module: str) -> None:
    """pydantic's plugin loader (``importlib.metadata`` and a scan of every installed distribution) is not
    in a service process, nor is importlib.metadata by the start-up's preflight check; pydantic's models
    build and validate as before."""
    out = subprocess.run([sys.executable, "-c", PLUGINS, module], capture_output=True, text=True, check=True,
                         timeout=60)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == {"plugins": [], "ok": True, "refused": True, "metadata": False}


def test_the_plugin_loader_of_a_process_that_is_no_service_is_pydantics() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, json; from pydantic import BaseModel\n"
                          "class M(BaseModel):\n    a: int\n"
                          "print(json.dumps('importlib.metadata' in sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True
