#!/bin/sh
# capture.sh INTERFACE DIR: capture a lab network into DIR/capture.pcap.
#
# Runs in the host network namespace and captures on the Docker bridge of the
# core network (named by the compose file's com.docker.network.bridge.name);
# tshark puts the bridge in promiscuous mode, so it also sees the frames
# bridged between the containers.  DIR/keys is the daemons' --keylog
# directory, made by gen-keys.sh (owned by gdoid, 0700, with a
# decode_as_entries file so that Wireshark reads UDP 848 as ISAKMP); this
# service, root without CAP_DAC_OVERRIDE, does not touch it.  Open the result with
#     WIRESHARK_CONFIG_DIR=DIR/keys wireshark DIR/capture.pcap
# The pcap is complete once the service is stopped (docker-compose stop capture).
set -eu
iface=$1
dir=$2
i=0
until ip link show dev "$iface" >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -le 30 ] || { echo "capture: no interface $iface" >&2; exit 1; }
    sleep 1
done
rm -f "$dir/capture.pcap"
echo "capture: $iface -> $dir/capture.pcap"
exec tshark -q -n -i "$iface" -F pcap -w "$dir/capture.pcap"
