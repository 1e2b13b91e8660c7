"""The web page in ``chargegate demo``: 8080 (or 8081...8089, else a free port), a household login, Home
Assistant discovery on (the documents show up under ``homeassistant/`` for the ``user`` account)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_USER = "household"
DEMO_PASSWORD = "demo"


def demo_setup(dirpath: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    from chargegate.broker import first_free

    port = first_free(range(8080, 8090))  # the same port on every run when it is free
    cfg["web"] = {"host": "127.0.0.1", "port": port,
                  "users": [{"name": DEMO_USER, "role": "admin", "password": DEMO_PASSWORD}]}
    cfg["homeassistant"] = {"enabled": True}
    url = f"http://127.0.0.1:{port}/"
    return {"url": url, "notes": [f"web page: {url}  (login: {DEMO_USER} / {DEMO_PASSWORD})"]}
