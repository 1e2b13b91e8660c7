"""The web page in ``chargegate demo``: a free port (8080 when it is free), a household login, Home
Assistant discovery on (the documents show up under ``homeassistant/`` for the ``user`` account)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_USER = "household"
DEMO_PASSWORD = "demo"


def demo_setup(dirpath: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    from chargegate.broker import free_port, port_free

    port = 8080 if port_free(8080) else free_port()
    cfg["web"] = {"host": "127.0.0.1", "port": port,
                  "users": [{"name": DEMO_USER, "role": "admin", "password": DEMO_PASSWORD}]}
    cfg["homeassistant"] = {"enabled": True}
    url = f"http://127.0.0.1:{port}/"
    return {"url": url, "notes": [f"web page: {url}  (login: {DEMO_USER} / {DEMO_PASSWORD})"]}
