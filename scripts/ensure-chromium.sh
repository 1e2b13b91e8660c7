#!/usr/bin/env bash
# Makes sure Debian's Chromium and its WebDriver are installed for the browser tests of the web page
# (tests/web/test_web_browser.py drives them headless with Selenium). Nothing downloads a browser of its
# own: Selenium is pointed at /usr/bin/chromium and /usr/bin/chromedriver.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium and chromium-driver with apt-get ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
  exit 0
fi
echo "Chromium is not installed; the browser tests of the web page will be skipped. As root:" >&2
echo "    sudo apt-get install chromium chromium-driver" >&2
exit 0
