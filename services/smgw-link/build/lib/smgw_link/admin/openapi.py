"""The admin API's OpenAPI document, as FastAPI generates it from the routes and models.

A copy is committed as ``services/smgw-link/openapi.json`` (a test keeps it up to date);
``chargegate admin openapi --out services/smgw-link/openapi.json`` rewrites it. The running
service serves the same document at ``/v1/openapi.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

COMMITTED = Path(__file__).resolve().parents[2] / "openapi.json"


def document() -> dict[str, Any]:
    from smgw_link.admin.app import make_app
    from smgw_link.admin.core import AdminService

    # the routes only use the service when a request comes in: none is needed to describe them
    return make_app(cast(AdminService, None)).openapi()


def render() -> str:
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


def write(path: Path | None = None) -> Path:
    path = path or COMMITTED
    path.write_text(render())
    return path
