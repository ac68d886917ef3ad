#!/bin/sh
# demo.sh [basic|coop|mixed-versions]: from a checkout to a decrypted capture, in one command.
#
#   1. builds the images if one is missing (compose/build-base.sh; --build: always);
#   2. brings the topology up (docker-compose up -d) and waits until every daemon
#      is registered (`gdoictl wait registered` in each container);
#   3. basic only (the topology with LAN hosts and the ESP data path): pings
#      host-b from host-a and moves a 1 MiB file from host-b to host-a over TCP,
#      both through ESP between gm1 and gm2, and compares the SHA-256 at both ends;
#   4. stops the capture and prints its decrypted summary (tshark with the
#      daemons' key log): ISAKMP messages per exchange type, how many of the
#      encrypted ones decrypted, and ESP frames with a good ICV (esp.icv_good);
#   5. tears everything down (docker-compose down -v), also on failure or Ctrl-C.
#
# Exits 0 only if every step happened: registration, ping, the file arriving
# intact, Main Mode and GROUPKEY-PULL decrypted, and (basic) ESP present, every
# ESP frame decrypted with a good ICV, none with a bad one.  Needs root and a
# Docker engine (build-base.sh starts dockerd when none answers).  The capture
# stays in compose/<topology>/capture/ (pcap and key log) for a closer look:
#     WIRESHARK_CONFIG_DIR=compose/basic/capture/keys wireshark compose/basic/capture/capture.pcap
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
TOPO=basic
BUILD=0
for arg in "$@"; do
    case "$arg" in
        basic|coop|mixed-versions) TOPO=$arg ;;
        --build) BUILD=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "demo.sh: unknown argument $arg (basic|coop|mixed-versions, --build)" >&2; exit 2 ;;
    esac
done
GDOID_IMAGE=${GDOID_IMAGE:-gdoid:latest}
GDOID_BASE_IMAGE=${GDOID_BASE_IMAGE:-gdoid-base:bookworm}
export GDOID_IMAGE GDOID_BASE_IMAGE
DIR=$HERE/$TOPO
START=$(date +%s)

say() { printf '==> %s\n' "$*"; }
fail() { printf 'demo.sh: FAILED: %s\n' "$*" >&2; exit 1; }
dc() { (cd "$DIR" && docker-compose --ansi never "$@"); }
dx() { dc exec -T "$@"; }  # -T: no TTY, for scripts

# --- 1. images ---------------------------------------------------------------
if [ $BUILD = 1 ] || ! docker image inspect "$GDOID_IMAGE" >/dev/null 2>&1 \
        || ! docker image inspect "$GDOID_BASE_IMAGE" >/dev/null 2>&1; then
    say "building the images (compose/build-base.sh)"
    BASE_IMAGE=$GDOID_BASE_IMAGE "$HERE/build-base.sh" || fail "compose/build-base.sh"
else
    say "images $GDOID_IMAGE and $GDOID_BASE_IMAGE exist (--build to rebuild)"
fi

# --- 2. up, registered ------------------------------------------------------------
case $TOPO in
    basic) KSS="ks"; GMS="gm1 gm2" ;;
    coop) KSS="ks1 ks2 ks3"; GMS="gm1 gm2 gm3 gm4" ;;
    mixed-versions) KSS="ks"; GMS="gm1 gm2" ;;
esac
teardown() {
    st=$?
    trap - EXIT INT TERM
    say "tearing down (docker-compose down -v)"
    dc down -v --remove-orphans >/dev/null 2>&1 || st=1
    say "$TOPO: $([ $st = 0 ] && echo OK || echo FAILED) in $(( $(date +%s) - START )) s"
    exit $st
}
trap teardown EXIT
trap 'exit 130' INT TERM
dc down -v --remove-orphans >/dev/null 2>&1 || true   # leftovers of an aborted run
say "docker-compose up -d ($TOPO)"
dc up -d || fail "docker-compose up"
for svc in $GMS; do
    dx "$svc" gdoictl wait registered --timeout 90 || fail "$svc did not register"
done
for svc in $KSS; do
    dx "$svc" gdoictl wait ready --timeout 30 || fail "$svc is not serving"
done
dx "$(echo $KSS | cut -d' ' -f1)" gdoictl show crypto gdoi ks members

# --- 3. traffic through ESP (basic) ------------------------------------------------
if [ "$TOPO" = basic ]; then
    say "ping host-a -> host-b (10.48.1.10 -> 10.48.2.10, ESP between gm1 and gm2)"
    dx host-a ping -n -c 3 -i 0.2 -W 2 10.48.2.10 || fail "ping 10.48.2.10 from host-a"
    say "file host-b -> host-a over TCP (http://10.48.2.10:8080/demo.bin)"
    sent=$(dx host-b sh -c 'head -c 1048576 /dev/urandom >/mnt/demo.bin && sha256sum /mnt/demo.bin' | cut -d' ' -f1)
    got=$(dx host-a python3 -c "import hashlib, urllib.request as u
print(hashlib.sha256(u.urlopen('http://10.48.2.10:8080/demo.bin', timeout=30).read()).hexdigest())")
    echo "    sha256 sent     $sent"
    echo "    sha256 received $got"
    [ -n "$sent" ] && [ "$sent" = "$got" ] || fail "the file did not arrive intact"
    dx gm1 gdoictl show crypto ipsec sa | grep -E 'spi|pkts' || true
fi

# --- 4. the decrypted capture ----------------------------------------------------
say "capture: stopping tshark, decoding with the key log"
dc stop capture >/dev/null 2>&1 || fail "docker-compose stop capture"
[ -s "$DIR/capture/capture.pcap" ] || fail "empty capture"
fields=$(docker run --rm --network none -v "$DIR/capture:/capture:ro" -e WIRESHARK_CONFIG_DIR=/capture/keys \
    "$GDOID_BASE_IMAGE" tshark -n -r /capture/capture.pcap -Y '(isakmp && !icmp) || esp' -T fields \
    -e isakmp.exchangetype -e isakmp.flags -e isakmp.hash -e esp.spi -e esp.icv_good -e esp.icv_bad) \
    || fail "tshark could not read the capture"
summary=$(printf '%s\n' "$fields" | awk -F '\t' '
    function name(t) {
        return t == 2 ? "Main Mode" : t == 5 ? "Informational" : t == 32 ? "GROUPKEY-PULL" : \
               t == 33 ? "GROUPKEY-PUSH" : t == 35 ? "GROUPKEY-PUSH ack" : t == 240 ? "COOP ANN" : "type " t
    }
    $1 != "" {
        n[$1]++
        if (index("13579bdfBDF", substr($2, length($2))) > 0) {  # flags 0x.. & 1: encrypted
            enc[$1]++; if ($3 != "") dec[$1]++                       # its Hash payload dissected
        }
    }
    $4 != "" { esp++; if ($5 == "1") good++; if ($6 == "1") bad++ }
    END {
        for (t in n) printf "ISAKMP %-18s %4d messages, %4d encrypted, %4d decrypted\n", name(t), n[t], enc[t] + 0, dec[t] + 0
        printf "ESP %d frames, %d decrypted with a good ICV (esp.icv_good), %d bad\n", esp, good, bad
        # machine-readable last line: MM/PULL encrypted/decrypted, ESP frames/good/bad
        printf "CHECK %d %d %d %d %d %d %d\n", enc[2], dec[2], enc[32], dec[32], esp, good, bad
    }')
if [ "$TOPO" = basic ]; then
    printf '%s\n' "$summary" | grep -v '^CHECK' | sort
else
    printf '%s\n' "$summary" | grep -v -e '^CHECK' -e '^ESP' | sort
    echo "ESP: none expected ($TOPO has no data path; compose/basic has)"
fi
set -- $(printf '%s\n' "$summary" | grep '^CHECK')
shift
[ "$1" -gt 0 ] && [ "$1" = "$2" ] || fail "Main Mode: $2 of $1 encrypted messages decrypted"
[ "$3" -gt 0 ] && [ "$3" = "$4" ] || fail "GROUPKEY-PULL: $4 of $3 encrypted messages decrypted"
if [ "$TOPO" = basic ]; then
    [ "$5" -gt 0 ] || fail "no ESP on the core network"
    [ "$5" = "$6" ] && [ "$7" = 0 ] || fail "ESP: $6 of $5 frames with a good ICV, $7 bad"
fi
say "$TOPO works: registered$([ "$TOPO" = basic ] && echo ', ping and file through ESP'), capture decrypted"
