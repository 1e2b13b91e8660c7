"""Loaded by the ocpp-gateway process of bench_ocpp.py only (this folder is on its ``PYTHONPATH``, on no
other): the time each MeterValues frame reaches the gateway's OCPP layer and the time it leaves it, through
``OcppRpc``'s own ``on_frame`` hook (the gateway's recording hook, unused otherwise). Nothing in the gateway
is changed; per frame it costs a substring test and, for a MeterValues, one list append. At exit the
stamps go to the file named by ``BENCH_OCPP_STAMPS`` as JSON lines ``[time, charge box id, dir, raw]``.
"""

from __future__ import annotations

import atexit
import json
import os
import time

_PATH = os.environ.get("BENCH_OCPP_STAMPS")

if _PATH:
    from ocpp_gateway import rpc as _rpc

    _stamps: list[tuple[float, str, str, str]] = []
    _init = _rpc.OcppRpc.__init__

    def _init_stamped(self: _rpc.OcppRpc, *args: object, **kwargs: object) -> None:
        _init(self, *args, **kwargs)  # type: ignore[arg-type]
        if self.on_frame is None:
            name, add, now = self.name, _stamps.append, time.time

            def on_frame(direction: str, raw: str) -> None:
                if '"MeterValues"' in raw:
                    add((now(), name, direction, raw))

            self.on_frame = on_frame

    _rpc.OcppRpc.__init__ = _init_stamped  # type: ignore[method-assign]

    @atexit.register
    def _dump() -> None:
        with open(_PATH, "w", encoding="utf-8") as f:
            for s in _stamps:
                f.write(json.dumps(s) + "\n")
