#!/bin/sh
# capture-summary.sh DIR: the decrypted summary of a compose topology's capture.
#
# DIR is a topology directory (compose/basic, compose/coop, ...) whose capture
# service wrote DIR/capture/capture.pcap and whose daemons wrote their key log
# to DIR/capture/keys.  Writes DIR/capture/capture-decrypted.pcap beside the raw
# capture (`gdoid decrypt-pcap`: GROUPKEY-PUSH decrypted; mode 0600, it holds
# keys) and prints
#   - every ISAKMP/GDOI message: frame, time, addresses, exchange, whether it
#     was sent in the clear, decrypted by Wireshark from the key log, decrypted
#     by decrypt-pcap (pushes), or is still encrypted, and its payloads;
#   - ESP per SPI: packets, good ICV, bad ICV, not checked (no key);
#   - a last line "capture-summary: ..." with the totals.
# Exit 0 when something was decrypted (an ISAKMP message or an ESP packet with
# a good ICV), 1 when nothing was, 2 on a usage error or a missing capture.
#
# Runs in the gdoid image (${GDOID_IMAGE:-gdoid:latest}, which has tshark when
# built by build-base.sh) as root, which can read the daemons' 0700 key log,
# with this checkout's gdoid mounted over the image's; with
# CAPTURE_SUMMARY_TOOLS=host (or without docker) it uses the host's tshark and
# python3 with this checkout on PYTHONPATH instead.  docs/captures.md.
set -eu

usage() { echo "usage: compose/capture-summary.sh TOPOLOGY_DIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
cap="${1%/}/capture"
if [ "${CAPTURE_SUMMARY_INSIDE:-}" != 1 ]; then
    [ -s "$cap/capture.pcap" ] || { echo "capture-summary: no capture at $cap/capture.pcap" >&2; exit 2; }
    [ -d "$cap/keys" ] || { echo "capture-summary: no key log at $cap/keys" >&2; exit 2; }
    repo=$(cd "$(dirname "$0")/.." && pwd)
    image=${GDOID_IMAGE:-gdoid:latest}
    if [ "${CAPTURE_SUMMARY_TOOLS:-docker}" != host ] && command -v docker >/dev/null 2>&1 \
        && docker image inspect "$image" >/dev/null 2>&1; then
        cap=$(cd "$cap" && pwd)
        exec docker run --rm --network none --user 0:0 --entrypoint /bin/sh \
            -e CAPTURE_SUMMARY_INSIDE=1 -e PYTHONPATH=/src \
            -v "$cap:/topology/capture" -v "$repo/gdoid:/src/gdoid:ro" \
            -v "$repo/compose/capture-summary.sh:/capture-summary.sh:ro" \
            "$image" /capture-summary.sh /topology
    fi
    PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONPATH
fi
command -v tshark >/dev/null 2>&1 || { echo "capture-summary: tshark is not installed" >&2; exit 2; }

raw="$cap/capture.pcap"
out="$cap/capture-decrypted.pcap"
keys="$cap/keys"
python3 -m gdoid.cli.daemon decrypt-pcap "$raw" "$out" --keylog "$keys"

WIRESHARK_CONFIG_DIR=$keys
export WIRESHARK_CONFIG_DIR
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Not ISAKMP quoted in ICMP errors (cut short); no -d: the key log's decode_as_entries says UDP 848.
tshark -n -r "$out" -Y 'isakmp && !icmp' -T fields -E separator='|' -E aggregator=, \
    -e frame.number -e frame.time_relative -e ip.src -e ip.dst -e isakmp.exchangetype \
    -e isakmp.flag_e -e isakmp.typepayload -e isakmp.seq.seq -e isakmp.notify.msgtype -e isakmp.sak.spi \
    >"$tmp/isakmp" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 2; }
# ESP quoted in an ICMP error is not a packet of its own (frame.protocols ...:icmp:ip:esp...).
tshark -n -r "$out" -Y esp -T fields -E separator='|' -E occurrence=f \
    -e esp.spi -e esp.icv_good -e esp.icv_bad -e frame.protocols >"$tmp/esp" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 2; }

awk -F'|' -v esp="$tmp/esp" '
BEGIN {
    x[2] = "Main Mode"; x[5] = "Informational"; x[32] = "GROUPKEY-PULL"; x[33] = "GROUPKEY-PUSH"
    x[35] = "PUSH-ACK"; x[240] = "COOP ANN"
    p[1] = "SA"; p[4] = "KE"; p[5] = "ID"; p[6] = "CERT"; p[7] = "CR"; p[8] = "HASH"; p[9] = "SIG"
    p[10] = "NONCE"; p[11] = "N"; p[12] = "D"; p[13] = "VID"; p[15] = "SAK"; p[16] = "SAT"; p[17] = "KD"
    p[18] = "SEQ"; p[19] = "POP"; p[22] = "GAP"; p[128] = "ANN"
    n[36864] = "GM_REMOVAL"; n[36865] = "POLICY_REPLACE"
    print "ISAKMP/GDOI messages (frame, seconds, source -> destination, exchange, state, payloads):"
}
{
    name = ($5 in x) ? x[$5] : "exchange " $5
    if ($6 == "1" || $6 == "True") state = ($7 == "") ? "ENCRYPTED" : "decrypted"
    else if ($5 == 33) state = "decrypt-pcap"
    else state = "clear"
    total++; count[state]++
    np = split($7, types, ","); ns = split($9, notes, ","); shown = ""; k = 0
    for (i = 1; i <= np; i++) {
        if (types[i] == 2 || types[i] == 3) continue  # proposals and transforms inside an SA
        t = (types[i] in p) ? p[types[i]] : types[i]
        if (t == "SEQ" && $8 != "") t = t "(" $8 ")"
        if (t == "SA" && $10 != "") t = t ",SAK"  # Wireshark lists the SAK only as a field
        if (t == "N" && k < ns) { k++; t = t "(" ((notes[k] in n) ? n[notes[k]] : notes[k]) ")" }
        shown = shown (shown != "" ? "," : "") t
    }
    printf "%6d %8.3f %-15s -> %-15s %-14s %-12s %s\n", $1, $2, $3, $4, name, state, shown
}
END {
    if (total == 0) print "    (none)"
    while ((getline line < esp) > 0) {
        split(line, f, "|"); spi = f[1]
        if (f[4] ~ /icmp:ip:esp/) continue
        if (!(spi in packets)) order[++spis] = spi
        packets[spi]++; esp_total++
        if (f[2] == "1" || f[2] == "True") { good[spi]++; esp_good++ }
        else if (f[3] == "1" || f[3] == "True") { bad[spi]++; esp_bad++ }
    }
    print "ESP (SPI: packets, good ICV, bad ICV, not checked):"
    if (spis == 0) print "    (none)"
    for (i = 1; i <= spis; i++) {
        s = order[i]
        printf "    %s: %d packets, %d good ICV, %d bad ICV, %d not checked\n", s, packets[s], good[s], bad[s], packets[s] - good[s] - bad[s]
    }
    decrypted = count["decrypted"] + count["decrypt-pcap"]
    printf "capture-summary: ISAKMP %d messages (%d clear, %d decrypted from the key log, %d pushes decrypted by decrypt-pcap, %d still encrypted); ESP %d packets, %d good ICV, %d bad ICV\n", total, count["clear"], count["decrypted"], count["decrypt-pcap"], count["ENCRYPTED"], esp_total, esp_good, esp_bad
    exit (decrypted + esp_good > 0) ? 0 : 1
}' "$tmp/isakmp"
