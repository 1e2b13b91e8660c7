#!/usr/bin/env bash
# Makes sure Debian's container engine, docker-compose and debootstrap are installed for the test that
# builds and runs the compose stack (tests/docker/test_stack.py, marker `docker`). Debian 12 has no
# compose v2 plugin: its docker-compose (1.29) reads the same compose files, and the test uses
# `docker compose` instead wherever that plugin is installed. Nothing starts an engine here: the test
# starts its own dockerd (own data root in the cache, own socket) and stops it afterwards.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
if have dockerd && have debootstrap && { have docker-compose || docker compose version >/dev/null 2>&1; }; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && have apt-get; then
  echo "installing docker.io, docker-compose and debootstrap with apt-get ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d (if present) keeps the package from starting a system-wide engine
  apt-get install -y -qq --no-install-recommends docker.io docker-compose debootstrap >/dev/null
  exit 0
fi
echo "docker.io, docker-compose or debootstrap is missing; the compose stack test will be skipped. As root:" >&2
echo "    sudo apt-get install docker.io docker-compose debootstrap" >&2
exit 0
