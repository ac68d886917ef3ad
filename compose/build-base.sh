#!/bin/sh
# Build the gdoid container images without any registry:
#
#   1. gdoid-base:bookworm  - a Debian bookworm rootfs made with debootstrap and
#                             `docker import`ed (python3, python3-venv, tshark,
#                             iproute2, nftables, iptables, iputils-ping)
#   2. compose/wheels/      - the project's wheel and its dependencies, built on
#                             the host (`pip wheel`)
#   3. gdoid:latest         - the repository's Dockerfile built FROM the base
#                             image, installing offline from the wheelhouse
#
# Idempotent and reproducible: the rootfs tarball is cached (default
# /var/cache/gdoid-base) and the base image is only re-imported when its package
# list changes; wheels are built with SOURCE_DATE_EPOCH (fixed zip timestamps), so
# the same source gives the same bytes, step 3 hits Docker's layer cache and the
# image ID stays the same.  The builder stage is tagged <GDOID_IMAGE>-builder (the
# cache for the next run), and images of ours that a new build leaves untagged
# (dangling) are removed: no leftovers per run.  Needs root (debootstrap) and a
# Docker engine (started here when `docker info` fails).
#
# Usage: compose/build-base.sh [--rebuild-base] [--no-image]
# Environment (all optional):
#   BASE_IMAGE   name of the base image      (gdoid-base:bookworm)
#   GDOID_IMAGE  name of the gdoid image     (gdoid:latest)
#   CACHE_DIR    rootfs tarball cache        (/var/cache/gdoid-base)
#   MIRROR       Debian mirror               (http://deb.debian.org/debian)
#   PYTHON       host Python used for `pip wheel` (python3; must be 3.11 like the image)
#   WHEELHOUSE   wheel directory, inside the repository (compose/wheels)
#   SOURCE_DATE_EPOCH  timestamp of the files in the wheels (315532800, 1980-01-01)
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-gdoid-base:bookworm}
GDOID_IMAGE=${GDOID_IMAGE:-gdoid:latest}
CACHE_DIR=${CACHE_DIR:-/var/cache/gdoid-base}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-compose/wheels}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}
export SOURCE_DATE_EPOCH
PACKAGES="python3,python3-venv,iproute2,nftables,iptables,iputils-ping,tshark,ca-certificates,procps"
# The daemon imports pyroute2 for the GM data path; add it if pyproject.toml does not list it.
EXTRA_WHEELS="setuptools wheel"

REBUILD_BASE=0
BUILD_IMAGE=1
for arg in "$@"; do
    case "$arg" in
        --rebuild-base) REBUILD_BASE=1 ;;
        --no-image) BUILD_IMAGE=0 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "build-base.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-base.sh: error: %s\n' "$*" >&2; exit 1; }
run() { printf '    $ %s\n' "$*" >&2; "$@"; }

START=$(date +%s)

# --- 0. prerequisites -----------------------------------------------------
command -v docker >/dev/null 2>&1 || die "docker is not installed (apt-get install docker.io)"
if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "the Docker engine is not running and we are not root to start it"
    command -v dockerd >/dev/null 2>&1 || die "the Docker engine is not running and dockerd is not installed"
    say "starting dockerd (log: /var/log/dockerd.log)"
    # Not inheriting our other descriptors: a caller's lock (e.g. `flock FILE build-base.sh`)
    # would otherwise stay held by the long-lived dockerd.
    dockerd >/var/log/dockerd.log 2>&1 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
    i=0
    until docker info >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -le 60 ] || die "dockerd did not come up within 60 s; see /var/log/dockerd.log"
        sleep 1
    done
fi

# --- 1. base image --------------------------------------------------------
HASH=$(printf '%s %s %s v1' "$SUITE" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-12)
have_base() {
    [ "$(docker image inspect -f '{{index .Config.Labels "org.gdoid.base-hash"}}' "$BASE_IMAGE" 2>/dev/null || true)" = "$HASH" ]
}
if [ $REBUILD_BASE = 0 ] && have_base; then
    say "base image $BASE_IMAGE is up to date (package-list hash $HASH)"
else
    TARBALL="$CACHE_DIR/$SUITE-minbase-$HASH.tar.gz"
    if [ $REBUILD_BASE = 1 ] || [ ! -s "$TARBALL" ]; then
        [ "$(id -u)" = 0 ] || die "debootstrap needs root"
        command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (apt-get install debootstrap)"
        mkdir -p "$CACHE_DIR"
        ROOTFS=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
        trap 'rm -rf "$ROOTFS"' EXIT INT TERM
        say "debootstrap $SUITE into $ROOTFS (about 90 s)"
        run debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1 \
            || die "debootstrap failed; see $CACHE_DIR/debootstrap.log"
        # Slim it down: package caches and lists are not needed in an image.
        rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log \
            "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
        printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$ROOTFS/etc/apt/sources.list"
        say "caching the rootfs as $TARBALL"
        tar -C "$ROOTFS" --numeric-owner --xattrs -czf "$TARBALL.tmp" . || die "could not write $TARBALL"
        mv "$TARBALL.tmp" "$TARBALL"
        rm -rf "$ROOTFS"
        trap - EXIT INT TERM
    else
        say "using the cached rootfs $TARBALL"
    fi
    say "docker import -> $BASE_IMAGE"
    run docker import \
        --change "LABEL org.gdoid.base-hash=$HASH" \
        --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase for gdoid (debootstrap)\"" \
        --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        "$TARBALL" "$BASE_IMAGE" >/dev/null || die "docker import failed"
fi
docker run --rm --network none "$BASE_IMAGE" python3 -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version' \
    || die "$BASE_IMAGE has no working python3.11 with venv"

# --- 2. wheelhouse on the host --------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "host python $PYTHON not found (set PYTHON=...)"
HOSTPY=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$HOSTPY" = 3.11 ] || die "host $PYTHON is $HOSTPY; the image runs 3.11, so binary wheels must be built with 3.11 (set PYTHON=python3.11)"
if grep -rqs '^from pyroute2\|^import pyroute2' "$REPO/gdoid" && ! grep -qs 'pyroute2' "$REPO/pyproject.toml"; then
    say "warning: gdoid imports pyroute2 but pyproject.toml does not depend on it; adding it to the image"
    EXTRA_WHEELS="$EXTRA_WHEELS pyroute2"
fi
mkdir -p "$REPO/$WHEELHOUSE"
say "building wheels on the host into $WHEELHOUSE (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
# shellcheck disable=SC2086
(cd "$REPO" && run "$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELHOUSE" . $EXTRA_WHEELS) \
    || die "pip wheel failed (the host needs an index or --find-links with the dependencies)"
ls "$REPO/$WHEELHOUSE"/gdoid-*.whl >/dev/null 2>&1 || die "no gdoid wheel in $WHEELHOUSE"
# The builder stage builds gdoid from the source tree itself; only the dependencies
# are needed here.  A host-built gdoid wheel would also carry whatever a stale
# build/ directory holds, and change the build context for nothing.
rm -f "$REPO/$WHEELHOUSE"/gdoid-*.whl
# shellcheck disable=SC2086
printf '%s\n' $EXTRA_WHEELS | grep -v -e '^setuptools$' -e '^wheel$' >"$REPO/$WHEELHOUSE/extra-requirements.txt" || true
say "wheelhouse: $(ls "$REPO/$WHEELHOUSE"/*.whl | wc -l) wheels"

# --- 3. the gdoid image ---------------------------------------------------
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
if [ $BUILD_IMAGE = 1 ]; then
    BUILDER_IMAGE="$GDOID_IMAGE-builder"
    OLD_ID=$(image_id "$GDOID_IMAGE")
    say "docker build -> $GDOID_IMAGE (FROM $BASE_IMAGE, offline from $WHEELHOUSE)"
    # Twice: the builder stage alone, tagged, so that the classic builder does not
    # leave it untagged; then the whole file (the builder stage from the cache).
    for target in builder ""; do
        if [ -n "$target" ]; then set -- --target "$target" -t "$BUILDER_IMAGE"; else set -- -t "$GDOID_IMAGE"; fi
        (cd "$REPO" && run docker build --quiet --network none \
            --build-arg BASE="$BASE_IMAGE" --build-arg WHEELHOUSE="$WHEELHOUSE" --build-arg PIP_NO_INDEX=1 \
            --build-arg SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" "$@" -f Dockerfile .) >/dev/null \
            || die "docker build failed (rerun: cd $REPO && docker build --build-arg BASE=$BASE_IMAGE --build-arg WHEELHOUSE=$WHEELHOUSE --build-arg PIP_NO_INDEX=1 .)"
    done
    docker run --rm --network none --entrypoint gdoid "$GDOID_IMAGE" --help >/dev/null \
        || die "$GDOID_IMAGE does not run gdoid"
    NEW_ID=$(image_id "$GDOID_IMAGE")
    # Images of ours that lost their tag to this build (the previous gdoid image and
    # builder stage); never an image a container still uses.
    for label in org.gdoid.image org.opencontainers.image.title=gdoid; do
        docker image prune --force --filter "label=$label" >/dev/null || true
    done
    if [ "$OLD_ID" = "$NEW_ID" ]; then
        say "image $GDOID_IMAGE: $(echo "$NEW_ID" | cut -c1-19) (unchanged: same source, layer cache)"
    else
        say "image $GDOID_IMAGE: $(echo "$NEW_ID" | cut -c1-19) (new)"
    fi
fi
say "done in $(( $(date +%s) - START )) s"
