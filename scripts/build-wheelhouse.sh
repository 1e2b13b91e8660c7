#!/usr/bin/env bash
# The wheelhouse the images install from: build/wheelhouse/ holds a wheel of every package the
# services need at run time, at the versions pinned in requirements.lock, plus the build backend
# (setuptools) for the project's own packages; runtime.txt lists the runtime set (name==version).
# The Dockerfiles copy it and install with `pip install --no-index --find-links`, so an image build
# needs no package index and installs exactly these files (reproducible, offline).
#
# Built with the project's Python (.venv, or $PYTHON): it must be Python 3.11 on the images' CPU
# architecture, since binary wheels are made for one interpreter and platform. Rebuilt only when
# requirements.lock or a pyproject.toml changed (a stamp in the folder says which); with pip's
# cache a rebuild takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${WHEELHOUSE:-build/wheelhouse}"
SRC=(./shared ./services/*)

"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || {
  echo "build-wheelhouse: $PY is $("$PY" -V 2>&1), the images run Python 3.11: build the wheels with 3.11" >&2
  exit 1
}
stamp="$(cat requirements.lock "${SRC[@]/%//pyproject.toml}" "$0" | sha256sum | cut -c1-16)-$("$PY" -c \
  'import sysconfig; print(sysconfig.get_platform())')"
if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$stamp" ]; then
  exit 0
fi
setuptools="$(grep -E '^setuptools==' requirements.lock)" || {
  echo "build-wheelhouse: requirements.lock pins no setuptools (the build backend the images use)" >&2; exit 1; }
tmp="$(mktemp -d "${TMPDIR:-/tmp}/wheelhouse.XXXXXX")"
# setuptools leaves a build/ folder in each package it builds: remove the ones this run makes
made=()
for d in "${SRC[@]}"; do [ -e "$d/build" ] || made+=("$d/build"); done
trap 'rm -rf "$tmp" "${made[@]}"' EXIT
# the project's packages with every dependency, at the locked versions; then the build backend
if ! { "$PY" -m pip wheel --disable-pip-version-check -c requirements.lock -w "$tmp/w" "${SRC[@]}" &&
       "$PY" -m pip wheel --disable-pip-version-check --no-deps -w "$tmp/w" "$setuptools"; } >"$tmp/log" 2>&1; then
  tail -30 "$tmp/log" >&2; echo "build-wheelhouse: pip wheel failed (above)" >&2; exit 1
fi
# the project's own wheels are not part of it: the images build them from the copied source
projects="$(for d in "${SRC[@]}"; do sed -n 's/^name = "\(.*\)"/\1/p' "$d/pyproject.toml" | head -1; done)"
for name in $projects; do rm -f "$tmp/w/${name//-/_}"-*.whl; done
# runtime.txt: every wheel but the build backend, as name==version (from the wheel file names)
for w in "$tmp"/w/*.whl; do
  f="$(basename "$w")"; n="${f%%-*}"; rest="${f#*-}"; v="${rest%%-*}"
  [ "$n" = setuptools ] || echo "$n==$v"
done | sort -f > "$tmp/w/runtime.txt"
# every runtime wheel must be the version the lock pins (pip wheel honours -c; this checks it did)
while IFS== read -r n _ v; do
  grep -qiE "^${n//_/[-_]}==${v//./\\.}\$" requirements.lock || {
    echo "build-wheelhouse: $n==$v is not what requirements.lock pins" >&2; exit 1; }
done < "$tmp/w/runtime.txt"
echo "$stamp" > "$tmp/w/.stamp"
rm -rf "$OUT"; mkdir -p "$(dirname "$OUT")"; mv "$tmp/w" "$OUT"
echo "build-wheelhouse: $(wc -l < "$OUT/runtime.txt") runtime wheels + setuptools in $OUT ($(du -sh "$OUT" | cut -f1))" >&2
