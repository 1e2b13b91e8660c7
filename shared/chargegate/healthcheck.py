"""Container health check: exits 0 when this container's service reports itself online.

Reads the retained ``service/<name>/health`` topic with the service's own account. The
service name is taken from ``CHARGEGATE_SERVICE`` or from the container's main module.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from chargegate import config as cfgmod
from chargegate.broker import bus_settings


def main() -> int:
    service = os.environ.get("CHARGEGATE_SERVICE")
    if not service:
        try:
            cmdline = open("/proc/1/cmdline", "rb").read().split(b"\0")
            mod = cmdline[cmdline.index(b"-m") + 1].decode()
            service = mod.replace("_", "-")
            if service == "evse-poller" and os.environ.get("CHARGEGATE_POLLER_INSTANCE"):
                service = cfgmod.instance_service(os.environ["CHARGEGATE_POLLER_INSTANCE"])
        except (OSError, ValueError, IndexError):
            print("cannot tell which service this is; set CHARGEGATE_SERVICE", file=sys.stderr)
            return 1
    cfg = cfgmod.load(os.environ.get("CHARGEGATE_CONFIG", "/config/chargegate.yaml"))
    s = bus_settings(cfg, service)
    got = threading.Event()
    status: dict[str, str] = {}

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        try:
            status["s"] = json.loads(m.payload).get("status", "?")
        except ValueError:
            status["s"] = "?"
        got.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"healthcheck-{service}-{os.getpid()}")
    c.username_pw_set(s.username, s.password)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{cfg.site.topic_root}/service/{service}/health")
    c.on_message = on_message
    c.connect(s.host, s.port)
    c.loop_start()
    got.wait(5)
    c.loop_stop()
    print(f"{service}: {status.get('s', 'no health message')}")
    return 0 if status.get("s") == "online" else 1


if __name__ == "__main__":
    sys.exit(main())
