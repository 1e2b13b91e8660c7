"""The ``ocpp`` library's enumerations, without the rest of the library.

``ocpp.v16.enums`` and ``ocpp.v201.enums`` are leaf modules, but importing either runs its package's
``__init__``, which builds the library's ``ChargePoint`` with every message dataclass of the version
(``call``, ``call_result``, for 2.0.1 also ``datatypes``): about 3.3 MB in every ocpp-gateway process
(bench/footprint), which needs only the enumerations' values (and the library's JSON schema files); the
simulators use the library's ``ChargePoint`` in their own processes. So the two files are executed here
on their own; a process that has already imported the library's modules gets those.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import ocpp


def _enums(version: str) -> ModuleType:
    mod = sys.modules.get(f"ocpp.{version}.enums")
    if mod is not None:
        return mod
    path = Path(ocpp.__file__).parent / version / "enums.py"
    spec = importlib.util.spec_from_file_location(f"{__name__}.{version}", path)
    assert spec is not None and spec.loader is not None, path
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


e16 = _enums("v16")
e201 = _enums("v201")
