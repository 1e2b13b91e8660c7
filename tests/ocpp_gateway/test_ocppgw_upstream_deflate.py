"""The upstream connection's permessage-deflate (``ocpp_gateway.upstream.upstream_deflate``): offered as
websockets offers it by default, negotiated with a backend that takes it, with the smaller compressor;
messages small and large arrive unchanged in both directions."""

from __future__ import annotations

import json
import zlib

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.extensions.permessage_deflate import PerMessageDeflate, enable_client_permessage_deflate

from ocpp_gateway.upstream import UPSTREAM_DEFLATE_MEM_LEVEL, upstream_deflate


def test_the_offer_is_websockets_default() -> None:
    default = enable_client_permessage_deflate(None)[0]
    assert upstream_deflate().get_request_params() == default.get_request_params()


async def test_negotiated_and_messages_arrive_unchanged() -> None:
    async def echo(ws: ServerConnection) -> None:
        async for msg in ws:
            await ws.send(msg)

    async with serve(echo, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", extensions=[upstream_deflate()]) as ws:
            ext = [e for e in ws.protocol.extensions if isinstance(e, PerMessageDeflate)]
            assert len(ext) == 1
            assert ext[0].compress_settings == {"memLevel": UPSTREAM_DEFLATE_MEM_LEVEL}
            for n in (1, 10, 3000):  # up to ~200 KB: beyond the compressor's window
                values = [{"value": str(i), "measurand": "Energy.Active.Import.Register", "unit": "Wh"}
                          for i in range(n)]
                text = json.dumps([2, f"id-{n}", "MeterValues", {"connectorId": 1, "meterValue": [
                    {"timestamp": "2026-12-07T16:31:43.838Z", "sampledValue": values}]}])
                await ws.send(text)
                assert await ws.recv() == text
            big = zlib.compress(bytes(range(256)) * 400).hex()  # incompressible-ish, larger than the window
            await ws.send(big)
            assert await ws.recv() == big
