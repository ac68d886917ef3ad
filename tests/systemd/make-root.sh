#!/bin/sh
# A Debian bookworm root with systemd, for booting the units under a real systemd
# (systemd-nspawn -b).  Cached as a tarball keyed by the package list; prints its path.
#
# Usage: tests/systemd/make-root.sh      (root; debootstrap, about 2 minutes the first time)
# Environment: CACHE_DIR (/var/cache/gdoid-nspawn), MIRROR (http://deb.debian.org/debian)
set -eu
CACHE_DIR=${CACHE_DIR:-/var/cache/gdoid-nspawn}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES="systemd,systemd-sysv,python3,python3-venv,iproute2,procps"
HASH=$(printf '%s %s %s v1' "$SUITE" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-12)
TARBALL="$CACHE_DIR/$SUITE-systemd-$HASH.tar"
if [ ! -s "$TARBALL" ]; then
    mkdir -p "$CACHE_DIR"
    ROOTFS=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
    trap 'rm -rf "$ROOTFS"' EXIT INT TERM
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" \
        >"$CACHE_DIR/debootstrap.log" 2>&1 || {
        echo "make-root.sh: debootstrap failed; see $CACHE_DIR/debootstrap.log" >&2
        exit 1
    }
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
        "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
    # A booted container needs no getty on its console.
    rm -f "$ROOTFS"/etc/systemd/system/getty.target.wants/* 
    chmod 0755 "$ROOTFS"  # mktemp made it 0700: "/" of the booted system
    tar -C "$ROOTFS" --numeric-owner -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$ROOTFS"
    trap - EXIT INT TERM
fi
echo "$TARBALL"
