#!/usr/bin/env bash
# Build the base image asyncps-base:bookworm (Debian bookworm + python3 + venv) without a registry.
#
# Where a registry is reachable, skip this and build the Dockerfile with
# `--build-arg BASE=python:3.11-slim` instead. Where none is (air-gapped hosts, CI machines with
# only a Debian mirror), this makes an equivalent base from Debian packages alone:
#
#   debootstrap --variant=minbase bookworm ROOTFS MIRROR   (python3, python3-venv, ca-certificates)
#   tar -C ROOTFS -c . | docker import - asyncps-base:bookworm
#
# The image is cached: if `docker image inspect` finds the tag, nothing is done (use --force to
# rebuild). Needs root (debootstrap) and a Debian mirror: MIRROR, default deb.debian.org.
#
# Usage: deploy/base/build-base.sh [--force] [TAG]
set -euo pipefail

force=0
if [[ "${1:-}" == "--force" ]]; then force=1; shift; fi
TAG="${1:-${ASYNCPS_BASE_IMAGE:-asyncps-base:bookworm}}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3,python3-venv,ca-certificates"

die() { echo "build-base.sh: error: $*" >&2; exit 1; }

if [[ $force == 0 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "build-base.sh: $TAG is already built (docker image inspect found it); --force rebuilds it"
    exit 0
fi
command -v docker >/dev/null || die "docker is not installed"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
[[ $(id -u) == 0 ]] || die "debootstrap needs root; run as root or with sudo"

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/asyncps-base.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT
start=$SECONDS

echo "build-base.sh: debootstrap $SUITE ($PACKAGES) from $MIRROR into $rootfs"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (full log: $rootfs.log)"; }
rm -f "$rootfs.log"

# Trim what a container never needs: package caches and lists, docs, man pages, locales.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
       "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/usr/share/locale/* "$rootfs"/tmp/*
find "$rootfs"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +
# The same apt source as the host's mirror, so `apt-get update` works inside derived images.
echo "deb $MIRROR $SUITE main" >"$rootfs"/etc/apt/sources.list

echo "build-base.sh: importing $rootfs as $TAG"
tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "asyncps base: debian $SUITE minbase + $PACKAGES" - "$TAG" >/dev/null
echo "build-base.sh: built $TAG in $((SECONDS - start)) s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
