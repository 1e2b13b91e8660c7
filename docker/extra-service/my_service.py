"""Template of an extra service (README "Adding a service"): runs on the chargegate runtime under its own
broker account, reads what it likes and publishes only ``<root>/ext/<name>/<topic>`` (here ``hello``, every
``MY_SERVICE_INTERVAL_S`` seconds, with the number of wallboxes it has seen online) and its health.

Its name is ``CHARGEGATE_SERVICE`` (``my-service``); it must be listed in ``broker.extra_services`` so that
``broker init`` gives it an account."""

from __future__ import annotations

import asyncio
import os

from chargegate import payloads as p
from chargegate.bus import Message
from chargegate.runtime import ServiceContext, run_service

NAME = os.environ.get("CHARGEGATE_SERVICE", "my-service")
INTERVAL_S = float(os.environ.get("MY_SERVICE_INTERVAL_S", "5"))


async def serve(ctx: ServiceContext) -> None:
    online: dict[str, bool] = {}

    def on_status(msg: Message) -> None:  # validated by the registry before it gets here
        assert isinstance(msg.payload, p.EvseStatus)
        online[msg.payload.evse_id] = msg.payload.online

    ctx.bus.subscribe("evse.status", on_status)
    n = 0
    while True:
        n += 1
        data = {"n": n, "evses_online": sum(online.values())}
        ctx.bus.publish("ext.message", p.ExtMessage(service=ctx.name, topic="hello", data=data),
                        service=ctx.name, topic="hello")
        ctx.counters["hello_sent"] += 1
        await asyncio.sleep(INTERVAL_S)


if __name__ == "__main__":
    run_service(NAME, serve)
