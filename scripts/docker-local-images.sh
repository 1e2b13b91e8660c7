#!/usr/bin/env bash
# Local stand-ins for the two images compose pulls (python:3.11-slim, eclipse-mosquitto:2), made
# from Debian packages on this machine for an engine that cannot reach an image registry:
#
#   chargegate-local/python:3.11    debootstrap --variant=minbase of the host's Debian release with
#                                   python3 and python3-venv; a venv in /opt/python is first on PATH
#                                   (so `python` and `pip` are what they are in python:3.11-slim)
#   chargegate-local/mosquitto:2    the same minbase with mosquitto and netcat-openbsd; user mosquitto
#                                   is uid/gid 1883 and /mosquitto/{config,data,log} are its, as in
#                                   eclipse-mosquitto:2
#
# The root file systems are cached as tarballs under $CHARGEGATE_DOCKER_CACHE (default
# ~/.cache/chargegate/docker; the .debs too), keyed by this script's content and the release, and
# imported with `docker import` into the engine `docker` talks to (DOCKER_HOST) when it lacks them.
# Needs root, debootstrap and the host's Debian mirror (taken from its apt configuration).
# docker-compose.local.yml builds the stack on these images.
set -euo pipefail

CACHE="${CHARGEGATE_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chargegate/docker}"
DOCKER="${DOCKER:-docker}"
PY_TAG="chargegate-local/python:3.11"
MQ_TAG="chargegate-local/mosquitto:2"

say() { echo "docker-local-images: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
. /etc/os-release
CODENAME="${VERSION_CODENAME:?/etc/os-release names no VERSION_CODENAME}"
ARCH="$(dpkg --print-architecture)"
# the mirror this host's apt uses for its release (main component)
MIRROR="${CHARGEGATE_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' \
  'Created-By: Packages' 2>/dev/null | awk -v c="$CODENAME" '$2 == c && $3 == "main" {print $1; exit}')}"
[ -n "$MIRROR" ] || die "no apt source for $CODENAME main found (apt-get update first, or set CHARGEGATE_DEBIAN_MIRROR)"
RECIPE=2  # raise when what goes into a root file system changes outside the post_* functions
mkdir -p "$CACHE/debs"

unmount_below() {  # whatever debootstrap or chroot left mounted inside $1
  findmnt -rn -o TARGET | awk -v p="$1/" 'index($0, p) == 1' | sort -r | while read -r m; do umount -l "$m" || true; done
}

# rootfs NAME PACKAGES POSTSTEP: the cached tarball's path on stdout
rootfs() {
  local name="$1" include="$2" post="$3"
  # the cache key: release, architecture, packages and the post step (its code), nothing else
  local key; key="$(printf '%s\n' "$RECIPE" "$include" "$(declare -f "$post")" | sha256sum | cut -c1-12)"
  local tar="$CACHE/rootfs-$name-$CODENAME-$ARCH-$key.tar"
  if [ -s "$tar" ]; then echo "$tar"; return; fi
  local dir; dir="$(mktemp -d "$CACHE/build-$name.XXXXXX")"
  trap 'unmount_below "'"$dir"'"; rm -rf --one-file-system "'"$dir"'"' EXIT
  local t0=$SECONDS
  say "debootstrap $CODENAME ($ARCH, minbase + $include) from $MIRROR ..."
  if ! debootstrap --variant=minbase --include="$include" --cache-dir="$CACHE/debs" \
        "$CODENAME" "$dir/root" "$MIRROR" >"$dir/debootstrap.log" 2>&1; then
    tail -20 "$dir/debootstrap.log" >&2
    die "debootstrap failed (log above)"
  fi
  "$post" "$dir/root"
  # what an image does not need: package lists, apt caches, logs, documentation (the copyright files stay)
  rm -rf "$dir/root"/var/lib/apt/lists/* "$dir/root"/var/cache/apt/*.bin "$dir/root"/var/cache/apt/archives/*.deb \
         "$dir/root"/var/log/*.log "$dir/root"/tmp/* "$dir/root"/root/.cache \
         "$dir/root"/usr/share/man/* "$dir/root"/usr/share/info/* "$dir/root"/usr/share/locale/*
  find "$dir/root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
  unmount_below "$dir"
  tar -C "$dir/root" --numeric-owner --xattrs -cf "$tar.part" .
  mv "$tar.part" "$tar"
  unmount_below "$dir"; rm -rf --one-file-system "$dir"; trap - EXIT
  say "$name root file system: $(du -h "$tar" | cut -f1) in $((SECONDS - t0)) s ($tar)"
  echo "$tar"
}

post_python() {
  # python:3.11-slim has `python` and `pip` on PATH and installs into its own prefix; a venv gives the
  # same without touching Debian's externally managed /usr/lib/python3
  chroot "$1" /usr/bin/python3 -m venv /opt/python
  chroot "$1" /opt/python/bin/python -c 'import sys, venv, ssl, sqlite3; assert sys.version_info[:2] == (3, 11), sys.version'
}

post_mosquitto() {
  # eclipse-mosquitto:2 runs the broker as uid/gid 1883 (compose's broker-init hands it its files)
  chroot "$1" sh -ec '
    groupmod -g 1883 mosquitto && usermod -u 1883 -g 1883 mosquitto
    mkdir -p /mosquitto/config /mosquitto/data /mosquitto/log
    chown -R 1883:1883 /mosquitto /var/lib/mosquitto /var/log/mosquitto
    test -x /usr/sbin/mosquitto && command -v nc >/dev/null'
}

import_image() {  # import_image TAG TARBALL CHANGES...
  local tag="$1" tar="$2"; shift 2
  local want; want="$(basename "$tar" .tar)"
  if [ "$($DOCKER image inspect -f '{{index .Config.Labels "chargegate.rootfs"}}' "$tag" 2>/dev/null)" = "$want" ]; then
    return
  fi
  local args=(--change "LABEL chargegate.rootfs=$want")
  for c in "$@"; do args+=(--change "$c"); done
  $DOCKER import "${args[@]}" "$tar" "$tag" >/dev/null
  say "imported $tag"
}

py_tar="$(rootfs python python3,python3-venv post_python)"
mq_tar="$(rootfs mosquitto mosquitto,netcat-openbsd post_mosquitto)"
if [ "${1:-}" = "--rootfs-only" ]; then exit 0; fi
import_image "$PY_TAG" "$py_tar" \
  "ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  "ENV LANG=C.UTF-8" 'CMD ["python3"]'
import_image "$MQ_TAG" "$mq_tar" "ENV LANG=C.UTF-8" "EXPOSE 1883" "VOLUME [\"/mosquitto/data\", \"/mosquitto/log\"]" \
  'CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]'
