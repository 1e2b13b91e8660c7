"""MQTT client to the operator's CLS.EEDI broker, through the CLS channel.

paho connects its socket to the endpoint's local forwarding listener, while TLS (SNI and the
certificate check) and everything else use the operator broker's real host name: the channel is
transparent, the TLS session is end to end. paho's thread only moves bytes; every callback is
handed to the asyncio loop.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from chargegate.config.smgw import ClsEedi
from smgw_link.clseedi.messages import schema_errors

log = structlog.get_logger("smgw_link.clseedi.client")


class _ChannelClient(mqtt.Client):
    """A paho client whose TCP connection goes to ``connect_to`` instead of host:port."""

    connect_to: tuple[str, int] | None = None

    def _create_socket_connection(self) -> socket.socket:
        if self.connect_to is not None:
            return socket.create_connection(self.connect_to, timeout=self._connect_timeout)
        return super()._create_socket_connection()


class ClsEediClient:
    def __init__(self, cfg: ClsEedi, *, host: str, port: int, connect_to: tuple[str, int] | None,
                 on_message: Callable[[bytes], None], on_link: Callable[[bool, str | None], None],
                 client_cert: tuple[Path, Path] | None = None) -> None:
        self.cfg = cfg
        self.host = host
        self.port = port
        self.on_message = on_message
        self.on_link = on_link
        self.connected = False
        self.sent = 0
        self.invalid_outgoing = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        cid = cfg.client_id or f"{cfg.device_id}-{uuid.uuid4().hex[:6]}"
        c = _ChannelClient(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True)
        c.connect_to = connect_to
        c.reconnect_delay_set(min_delay=1, max_delay=5)  # the forwarder fails fast; keep retrying briskly
        c.max_queued_messages_set(1000)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password.reveal() if cfg.password else None)
        if cfg.tls:
            ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if client_cert is not None:
                ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
            c.tls_set_context(ctx)
        c.on_connect = self._paho_connect
        c.on_disconnect = self._paho_disconnect
        c.on_message = self._paho_message
        self._client = c

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self.host, self.port, keepalive=self.cfg.keepalive_s)
        self._client.loop_start()

    async def stop(self) -> None:
        self._closing = True
        self._client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)

    def publish(self, msg: dict[str, Any]) -> bool:
        errors = schema_errors(msg)
        if errors:  # a bug on our side: never put an invalid message on the wire
            self.invalid_outgoing += 1
            log.error("outgoing CLS.EEDI message violates the schema, not sent", type=msg.get("type"),
                      errors=errors)
            return False
        info = self._client.publish(self.cfg.from_device, json.dumps(msg, separators=(",", ":")), qos=self.cfg.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("CLS.EEDI message not sent", type=msg.get("type"), rc=mqtt.error_string(info.rc))
            return False
        self.sent += 1
        return True

    # -- paho thread ----------------------------------------------------------------------------------
    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _paho_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._post(self._link, False, f"operator broker refused the connection: {reason}")
            return
        client.subscribe(self.cfg.to_device, qos=self.cfg.qos)
        self._post(self._link, True, None)

    def _paho_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._post(self._link, False, f"operator broker connection lost: {reason}")

    def _paho_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.cfg.to_device:
            self._post(self.on_message, bytes(msg.payload))

    def _link(self, up: bool, error: str | None) -> None:
        if self._closing:
            return
        if up != self.connected:
            self.connected = up
            if up:
                log.info("connected to the operator's CLS.EEDI broker", host=self.host, port=self.port,
                         topic=self.cfg.to_device)
            else:
                log.warning("operator CLS.EEDI broker not connected", host=self.host, error=error)
        self.on_link(up, error)
