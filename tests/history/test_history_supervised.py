"""A bug in the recording loop does not stop the history service: the loop is logged, counted in the
health's ``task_restarts`` and restarted, and it samples and commits again (real broker, real SQLite)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from chargegate.runtime import start_context, stop_context
from conftest import BrokerHandle, health_seen, make_config, wait_for
from history import service as histmod
from history.service import History

CONFIG = """
site: {name: history-supervised}
circuits:
  - {id: grid, fuse_a: 35}
evses:
  - {id: hs1, circuit: grid, ocpp: {charge_box_id: HS1}}
"""


async def test_record_loop_comes_back_after_a_failure(broker: BrokerHandle, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(histmod, "FLUSH_S", 0.05)
    cfg = make_config(tmp_path, CONFIG + f"broker: {{port: {broker.port}}}\nstate_dir: {broker.config.state_dir}\n"
                      f"history: {{db_file: {tmp_path / 'h.sqlite'}}}\n")
    ctx = await start_context("history", cfg, None, connect_timeout=5)
    h = History(ctx)
    real = h.rec.sample
    calls: list[int] = []
    armed = [False]

    def sample(*a: Any) -> Any:
        if armed and armed[0]:
            armed.clear()
            raise ValueError("injected")
        calls.append(1)
        return real(*a)

    h.rec.sample = sample  # type: ignore[method-assign]
    task = asyncio.create_task(h.run())
    try:
        await wait_for(lambda: len(calls) >= 2)
        armed[0] = True
        await wait_for(lambda: not armed)
        n = len(calls)
        await wait_for(lambda: len(calls) >= n + 2)  # sampling again
        health = await health_seen(broker, ctx, lambda h: h.task_restarts)
        assert health.task_restarts == {"record-loop": 1}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await stop_context(ctx)
