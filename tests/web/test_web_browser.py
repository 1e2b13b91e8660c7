"""The web page in a real browser (Debian's chromium and chromedriver, headless, driven by Selenium; nothing
downloads a browser) against the running demo - every service and simulator as processes: the address the
demo prints, the login, the live operator limit raised to the §14a floor, a car unplugged and plugged in
again, a charging mode switched on the page, a 360 px wide phone screen without sideways scrolling, and the
page's weight. Screenshots go to ``test-artifacts/web/`` (``CHARGEGATE_TEST_ARTIFACTS`` overrides)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.system,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="Debian's chromium and chromium-driver are not installed "
                                        "(scripts/ensure-chromium.sh installs them as root)")]

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CHARGEGATE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "web"


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "chargegate.cli", "demo", "--dir", str(tmp), "--no-status"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := rx.search(line):
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-30:]))

    def cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "chargegate.cli", *args, "--config", str(self.dir / "chargegate.yaml")],
                       check=True, capture_output=True, timeout=30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                return -9
        return self.proc.returncode


def wait(what: str, cond: Callable[[], Any], timeout: float, show: Callable[[], Any] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            got = cond()
        except Exception as e:  # an element replaced by a live update in between: look again
            got, last = None, e
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s ({last!r})" + (f"; {show()}" if show else ""))


def shot(d: WebDriver, name: str, full: bool = True) -> Path:
    """A screenshot of the whole page (the window made as tall as the page for it)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    size = d.get_window_size()
    d.execute_script("window.scrollTo(0, 0)")
    if full:
        d.set_window_size(size["width"], int(d.execute_script("return document.documentElement.scrollHeight")) + 20)
        time.sleep(0.3)
    path = ARTIFACTS / name
    d.save_screenshot(str(path))
    d.set_window_size(size["width"], size["height"])
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = Demo(tmp_path_factory.mktemp("webdemo"))
    try:
        yield d
    finally:
        assert d.stop() == 0, "\n".join(d.lines[-30:])


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM  # type: ignore[assignment]
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=360,800",
              "--lang=en-US"):
        opts.add_argument(a)
    d = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))  # type: ignore[arg-type]
    d.set_page_load_timeout(20)
    try:
        yield d
    finally:
        d.quit()


def fresh(fn: Callable[[], Any]) -> Any:
    """``fn()`` again when a live update replaced the element it was reading."""
    for _ in range(20):
        try:
            return fn()
        except StaleElementReferenceException:
            time.sleep(0.05)
    return fn()


def text_of(d: WebDriver, css: str) -> str:
    return str(fresh(lambda: d.find_element(By.CSS_SELECTOR, css).text))


def attr(d: WebDriver, element_id: str, name: str) -> str | None:
    return fresh(lambda: d.find_element(By.ID, element_id).get_attribute(name))  # type: ignore[no-any-return]


def test_the_page_shows_the_demo_live(demo: Demo, browser: WebDriver) -> None:
    d = browser
    url = demo.wait_line(r"web page:\s+(http://127\.0\.0\.1:\d+/)\s+\(login: (\S+) / (\S+)\)", 30)
    base, user, password = url.group(1), url.group(2), url.group(3)

    def login_page() -> bool:
        d.get(base)
        return "/login" in d.current_url and bool(d.find_elements(By.NAME, "password"))
    wait("the login page (the web service started)", login_page, 60)
    d.find_element(By.NAME, "name").send_keys(user)
    d.find_element(By.NAME, "password").send_keys(password)
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait("logged in and live", lambda: text_of(d, "#live") == "live", 20)
    assert d.current_url == base
    wait("every wallbox with a status", lambda: all(attr(d, f"evse-{e}", "data-state")
                                                    for e in ("alfen", "webasto", "charx", "ocpp-1")), 60)

    # the grid operator's 6 kW limit arrives through the SMGW; the controller raises it to the §14a floor
    wait("the operator's limit and the §14a floor on the page", lambda: (
        attr(d, "limit-dso", "data-active") == "yes" and attr(d, "floor", "data-applies") == "yes"), 120,
        lambda: text_of(d, "#sec-limits"))
    limit = text_of(d, "#limit-dso")
    assert "6.00 kW on the controllable devices (§14a)" in limit and "left)" in limit, limit
    assert "raised to the §14a minimum of 13.02 kW" in limit, limit
    assert "13.02 kW - applies now" in text_of(d, "#floor")
    assert any("§14a" in text_of(d, f"#evse-{e} .reason") for e in ("alfen", "webasto", "charx", "ocpp-1"))
    assert attr(d, "link-state", "data-state") == "up"
    assert "valid until" in text_of(d, "#cert-expiry")
    wait("the limit marked in the plot", lambda: int(attr(d, "plot", "data-actions") or 0) >= 1, 30)
    assert d.find_elements(By.CSS_SELECTOR, "#plot svg rect.act")
    shot(d, "01-phone-operator-limit-and-floor.png")
    # no sideways scrolling on a phone
    assert d.execute_script("return document.documentElement.scrollWidth") <= \
        d.execute_script("return window.innerWidth")
    d.set_window_size(1280, 900)
    time.sleep(0.5)
    shot(d, "02-wide-operator-limit-and-floor.png")
    d.set_window_size(360, 800)

    # a car leaves and comes back: the page follows without a reload
    marker = d.execute_script("window.__same_page = 1; return 1")
    demo.cli("sim", "unplug", "charx")
    wait("charx shown without a car", lambda: attr(d, "evse-charx", "data-state") == "available"
         and text_of(d, "#evse-charx .state") == "no car plugged in", 30, lambda: text_of(d, "#evse-charx"))
    demo.cli("sim", "plug", "charx", "--phases", "1")
    wait("charx shown with the car plugged in", lambda: attr(d, "evse-charx", "data-state")
         in ("preparing", "charging", "suspended"), 30, lambda: text_of(d, "#evse-charx"))
    assert "car plugged in" in text_of(d, "#evse-charx .state") or text_of(d, "#evse-charx .state") == "charging"
    assert d.execute_script("return window.__same_page") == marker  # live, not reloaded
    shot(d, "03-phone-car-plugged-in.png")

    # switch a mode on the page: it goes through the history service, and the controller pauses the wallbox
    # the section is re-rendered live while the user chooses: the choice survives it (the page keeps it)
    fresh(lambda: Select(d.find_element(By.CSS_SELECTOR, "#evse-alfen select")).select_by_value("off"))
    time.sleep(5.5)  # at least one re-render of the wallboxes in between
    assert fresh(lambda: Select(d.find_element(By.CSS_SELECTOR, "#evse-alfen select"))
                 .first_selected_option.get_attribute("value")) == "off"
    fresh(lambda: d.find_element(By.CSS_SELECTOR, "#evse-alfen form.mode-form button").click())
    wait("the answer", lambda: text_of(d, "#evse-alfen .result") == "set to off", 20)
    wait("the mode confirmed", lambda: attr(d, "evse-alfen", "data-mode") == "off", 20,
         lambda: text_of(d, "#evse-alfen"))
    wait("alfen paused by its mode", lambda: text_of(d, "#evse-alfen .granted") == "0 A (paused)"
         and "charging mode off (set by web:household)" in text_of(d, "#evse-alfen .reason"), 30,
         lambda: text_of(d, "#evse-alfen"))
    assert text_of(d, "#evse-alfen .mode") == "off: does not charge"
    shot(d, "04-phone-mode-off.png")

    # what the page weighs (HTML, script, style; the event stream and the plot's data are not part of it)
    sizes = d.execute_script("""
        const nav = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource')
            .filter(r => ['script', 'link', 'css'].includes(r.initiatorType));
        const fcp = performance.getEntriesByName('first-contentful-paint')[0];
        return {html: nav.decodedBodySize, assets: res.reduce((a, r) => a + r.decodedBodySize, 0), n: res.length,
                fcp: fcp ? fcp.startTime : null};""")
    print(f"page weight: {sizes}")
    assert sizes["n"] == 2 and 0 < sizes["html"] + sizes["assets"] < 250_000, sizes
    logs = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not logs, logs  # no script error, nothing refused by the Content-Security-Policy
