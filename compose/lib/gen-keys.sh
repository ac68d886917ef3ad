#!/bin/sh
# gen-keys.sh KS_DIR GM_DIR [CAPTURE_DIR]: fresh lab secrets, generated at `up`.
#
# KS_DIR gets psk.secret, rekey.key (the KEK signing key, shared by all KSs
# as GET VPN COOP requires) and coop.psk (the KSs' own COOP key, never given to
# GMs), GM_DIR gets psk.secret; all 0600 and owned by the
# daemons' user gdoid.  CAPTURE_DIR/keys, the daemons' --keylog directory, is
# made gdoid's, mode 0700 (gdoid refuses a key-log directory anyone else could
# write to).  Runs as uid 0 with CHOWN (and DAC_OVERRIDE to remove the previous
# run's gdoid-owned key log).  Existing keys
# are kept (so `docker-compose up` on a running topology changes nothing);
# `docker-compose down -v` deletes the volumes and with them the keys.  When
# new keys are made, the old capture (pcap and key log) in CAPTURE_DIR is
# removed, since it belongs to keys that no longer exist.
# Runs in the gdoid image: `gdoid lab --export` generates the keys.
set -eu
ks=$1
gm=$2
cap=${3:-}
owner=${KEY_OWNER:-gdoid}
umask 077
keylog_dir() {  # the daemons' --keylog DIR: theirs, private
    if [ -n "$cap" ] && [ -d "$cap" ]; then
        mkdir -p "$cap/keys"
        chmod 700 "$cap/keys"
        printf '%s\n' '# Written by compose/lib/gen-keys.sh: GDOI uses UDP 848.' \
            'decode_as_entry: udp.port,848,(none),ISAKMP' >"$cap/keys/decode_as_entries"
        chown -R "$owner:$owner" "$cap/keys"
    fi
}
if [ -s "$ks/psk.secret" ] && [ -s "$ks/rekey.key" ] && [ -s "$ks/coop.psk" ] && [ -s "$gm/psk.secret" ]; then
    echo "gen-keys: keeping the existing keys"
    keylog_dir
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
chown "$owner:$owner" "$ks/psk.secret" "$ks/rekey.key" "$ks/coop.psk" "$gm/psk.secret"
if [ -n "$cap" ] && [ -d "$cap" ]; then
    rm -rf "$cap/keys" "$cap/capture.pcap"
fi
keylog_dir
echo "gen-keys: new PSK and KEK signing key (RSA 2048) written"
