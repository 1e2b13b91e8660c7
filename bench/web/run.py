"""bench/web: the web page on this machine.

A real Mosquitto (project ACL, own accounts) on a free loopback port, the web service as its own process
(``python -m web``; ``web.view: lan``, so the bench's browser on 127.0.0.1 needs no login), ``--evses``
wallboxes configured with a status each on the bus, and Debian's chromium, headless, through Selenium.

Reported:

* the page's weight: HTML and its script and style (bytes), and what ``GET /`` takes to answer (p50/p99);
* first contentful paint of a fresh load in the browser (p50/max over ``--loads``);
* bus to screen: a wallbox status published on the bus until the page shows its new power, through the
  Server-Sent Events stream (p50/p99 over ``--updates``, 0.3 s apart; a change right after another waits for
  the service's 0.25 s render interval; the browser is polled every ~5 ms by Selenium).

    .venv/bin/python bench/web/run.py [--evses 20] [--loads 10] [--updates 30] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import LocalBroker, account_password, free_port


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))]


def config_text(state: Path, broker: int, web: int, n: int) -> str:
    evses = "\n".join(f"  - {{id: e{i}, name: Wallbox {i}, circuit: grid, modbus: {{profile: alfen-eve, "
                      f"host: 127.0.0.1, port: {20000 + i}}}}}" for i in range(n))
    return (f"site: {{name: web bench}}\nstate_dir: {state}\nbroker: {{port: {broker}}}\n"
            f"circuits:\n  - {{id: grid, fuse_a: 63}}\nevses:\n{evses}\n"
            f"web: {{port: {web}, view: lan}}\nservices: [web]\n")


def status(i: int, power: float) -> bytes:
    return p.EvseStatus(evse_id=f"e{i}", online=True, state="charging", current_a=[10.0, 10.0, 10.0],
                        power_w=power, source="evse-poller").to_json()


def main(args: argparse.Namespace) -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        print("bench/web: Debian's chromium and chromium-driver are needed (scripts/ensure-chromium.sh)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-web-"))
    bport, wport = free_port(), free_port()
    path = tmp / "chargegate.yaml"
    path.write_text(config_text(tmp / "state", bport, wport, args.evses))
    cfg = cfgmod.load(path)
    broker = LocalBroker.prepare(cfg, port=bport, persistence=False)
    broker.start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-web-poller")
    pub.username_pw_set("evse-poller", account_password(cfg, "evse-poller"))
    pub.connect("127.0.0.1", bport)
    pub.loop_start()
    for i in range(args.evses):
        pub.publish(f"chargegate/evse/e{i}/status", status(i, 1000.0), qos=1, retain=True).wait_for_publish(5)
    log = open(tmp / "web.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "web", "--config", str(path)], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{wport}/"
    browser = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "healthz", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        gets = []
        html = b""
        for _ in range(args.loads * 3):
            t0 = time.perf_counter()
            with urllib.request.urlopen(base, timeout=10) as r:
                html = r.read()
            gets.append((time.perf_counter() - t0) * 1000)
        assets = 0
        for name in ("app.js", "style.css"):
            with urllib.request.urlopen(base + "static/" + name, timeout=10) as r:
                assets += len(r.read())
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--window-size=360,800"):
            opts.add_argument(a)
        browser = webdriver.Chrome(options=opts, service=Service(driver))
        fcps = []
        for _ in range(args.loads):
            browser.get("about:blank")
            browser.get(base)
            fcp = None
            for _ in range(100):
                fcp = browser.execute_script("const e = performance.getEntriesByName('first-contentful-paint')[0];"
                                             " return e ? e.startTime : null")
                if fcp is not None:
                    break
                time.sleep(0.02)
            fcps.append(float(fcp or 0))
        while browser.execute_script("return document.getElementById('live').textContent") != "live":
            time.sleep(0.02)
        lat = []
        for k in range(args.updates):
            power = 2000.0 + 10 * k
            want = f"{power / 1000:.2f} kW"
            t0 = time.perf_counter()
            pub.publish("chargegate/evse/e0/status", status(0, power), qos=1, retain=True)
            while browser.execute_script("return document.querySelector('#evse-e0 .power').textContent") != want:
                if time.perf_counter() - t0 > 10:
                    raise AssertionError(f"update {k} not shown within 10 s")
                time.sleep(0.005)
            lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.3)
        out = {"evses": args.evses, "html_bytes": len(html), "assets_bytes": assets,
               "get_ms_p50": round(statistics.median(gets), 1), "get_ms_p99": round(pct(gets, 99), 1),
               "first_paint_ms_p50": round(statistics.median(fcps), 1), "first_paint_ms_max": round(max(fcps), 1),
               "bus_to_screen_ms_p50": round(statistics.median(lat), 1),
               "bus_to_screen_ms_p99": round(pct(lat, 99), 1)}
        print(json.dumps({"bench": "web", **out}))
        return 0
    finally:
        if browser is not None:
            browser.quit()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        pub.loop_stop()
        pub.disconnect()
        broker.discard()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evses", type=int, default=20)
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--updates", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="a few rounds only (the test suite runs this)")
    a = ap.parse_args()
    if a.smoke:
        a.evses, a.loads, a.updates = min(a.evses, 4), 2, 3
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(a))
