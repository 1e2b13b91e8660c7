# chargegate: two commands on a fresh Debian machine with Python 3.11:
#   make demo   - install everything and run the demo with built-in simulators
#   make test   - install everything and run the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
SERVICES := $(wildcard services/*/pyproject.toml)
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench-all clean mosquitto chromium docker wheelhouse local-images

demo: install mosquitto
	$(VENV)/bin/chargegate demo

test: install mosquitto chromium docker
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): requirements.txt requirements.lock shared/pyproject.toml $(SERVICES)
	@scripts/check-python.sh "$(PYTHON)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3"
	$(PY) -m pip install --quiet -c requirements.lock -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e shared $(addprefix -e ,$(dir $(SERVICES)))
	touch $(STAMP)

mosquitto:
	@scripts/ensure-mosquitto.sh

# Debian's chromium and chromedriver for the web page's browser tests (apt-get as root; else they are skipped)
chromium:
	@scripts/ensure-chromium.sh

# Debian's container engine, docker-compose and debootstrap for the compose stack test (apt-get as root; else skipped)
docker:
	@scripts/ensure-docker.sh

# what docker-compose.local.yml builds on: the wheelhouse and the local base images (root; engine at DOCKER_HOST)
wheelhouse: install
	scripts/build-wheelhouse.sh

local-images:
	scripts/docker-local-images.sh

lint: install
	$(VENV)/bin/ruff check .

# benchmarks print their figures; each takes a minute or two on a 2-core machine
bench-all: install mosquitto
	$(PY) bench/allocate/run.py
	$(PY) bench/allocate/service_latency.py
	$(PY) bench/poller/bench_poller.py
	$(PY) bench/ocpp/bench_ocpp.py
	$(PY) bench/curtail/run.py
	$(PY) bench/admin/run.py
	$(PY) bench/system/run.py
	$(PY) bench/web/run.py
	$(PY) bench/simulate/run.py

clean:
	rm -rf $(VENV) state test-artifacts
