#!/usr/bin/env bash
# Checks that the interpreter given is Python >= 3.11 with venv support.
set -euo pipefail
py="${1:-}"
if [ -z "$py" ] || ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "chargegate needs Python 3.11 or newer (python3.11 not found). On Debian: apt-get install python3 python3-venv" >&2
  exit 1
fi
if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "Python's venv module is missing. On Debian: apt-get install python3-venv" >&2
  exit 1
fi
