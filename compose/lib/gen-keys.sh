#!/bin/sh
# gen-keys.sh KS_DIR GM_DIR [CAPTURE_DIR]: fresh lab secrets, generated at `up`.
#
# KS_DIR gets psk.secret, rekey.key (the KEK signing key, shared by all KSs
# as GET VPN COOP requires) and coop.psk (the KSs' own COOP key, never given to
# GMs), GM_DIR gets psk.secret; all 0600.  Existing keys
# are kept (so `docker-compose up` on a running topology changes nothing);
# `docker-compose down -v` deletes the volumes and with them the keys.  When
# new keys are made, the old capture (pcap and key log) in CAPTURE_DIR is
# removed, since it belongs to keys that no longer exist.
# Runs in the gdoid image: `gdoid lab --export` generates the keys.
set -eu
ks=$1
gm=$2
cap=${3:-}
umask 077
if [ -s "$ks/psk.secret" ] && [ -s "$ks/rekey.key" ] && [ -s "$ks/coop.psk" ] && [ -s "$gm/psk.secret" ]; then
    echo "gen-keys: keeping the existing keys"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gdoid lab --export "$tmp" --gms 1 --kss 2 >/dev/null
cp "$tmp/psk.secret" "$ks/psk.secret"
cp "$tmp/rekey.key" "$ks/rekey.key"
cp "$tmp/coop.psk" "$ks/coop.psk"
cp "$tmp/psk.secret" "$gm/psk.secret"
chmod 600 "$ks/psk.secret" "$ks/rekey.key" "$ks/coop.psk" "$gm/psk.secret"
if [ -n "$cap" ] && [ -d "$cap" ]; then
    rm -rf "$cap/keys" "$cap/capture.pcap"
fi
echo "gen-keys: new PSK and KEK signing key (RSA 2048) written"
