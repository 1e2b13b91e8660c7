#!/usr/bin/env bash
# Makes sure the Mosquitto broker binary is installed (the tests and the demo start their own
# broker with the project's configuration; no system broker is needed or used).
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing mosquitto with apt-get ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
  exit 0
fi
echo "The Mosquitto broker is not installed. Install it as root, e.g.:" >&2
echo "    sudo apt-get install mosquitto" >&2
echo "(chargegate starts its own broker process; the system service is not needed)" >&2
exit 1
