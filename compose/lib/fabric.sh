#!/bin/sh
# fabric.sh open|close BRIDGE...: let routed lab traffic cross the Docker bridges.
#
# Docker isolates an `internal: true` network with FORWARD rules that drop any
# frame whose addresses are outside the network's subnet, and br_netfilter
# (bridge-nf-call-iptables=1) applies them to frames bridged between two
# containers of the same network.  GET VPN breaks that assumption twice: LAN
# hosts send to remote LAN addresses through their GM, and the GMs' ESP keeps
# the inner (LAN) addresses on the core network (address preservation).
# `open` inserts `-i BRIDGE -o BRIDGE -j ACCEPT` into DOCKER-USER (the chain
# Docker reserves for such rules) for each bridge: traffic between containers of
# the same lab network only; nothing to or from the host or other networks.
# Rules whose bridge no longer exists are pruned.  Runs in the host network
# namespace (network_mode: host) with NET_ADMIN; uses the same iptables backend
# (nft or legacy) as the Docker engine.
set -eu
action=${1:-}
shift || true
COMMENT=gdoid-compose

if iptables -w -n -L DOCKER-USER >/dev/null 2>&1; then
    ipt="iptables -w"
elif iptables-legacy -w -n -L DOCKER-USER >/dev/null 2>&1; then
    ipt="iptables-legacy -w"
else
    echo "fabric: no DOCKER-USER chain (is the Docker engine managing iptables?)" >&2
    exit 1
fi

rule() { echo "DOCKER-USER -i $1 -o $1 -m comment --comment $COMMENT -j ACCEPT"; }

# Prune rules of lab bridges that are gone.
$ipt -S DOCKER-USER | grep -- "--comment $COMMENT" | while read -r _a _chain _i br _rest; do
    if ! ip link show dev "$br" >/dev/null 2>&1; then
        # shellcheck disable=SC2046
        $ipt -D $(rule "$br") && echo "fabric: pruned the rule of the removed bridge $br"
    fi
done

case "$action" in
    open)
        for br in "$@"; do
            # shellcheck disable=SC2046
            if ! $ipt -C $(rule "$br") 2>/dev/null; then
                $ipt -I $(rule "$br")
            fi
            echo "fabric: traffic within bridge $br is accepted ($ipt DOCKER-USER)"
        done ;;
    close)
        for br in "$@"; do
            # shellcheck disable=SC2046
            while $ipt -C $(rule "$br") 2>/dev/null; do $ipt -D $(rule "$br"); done
            echo "fabric: rule for $br removed"
        done ;;
    *) echo "usage: fabric.sh open|close BRIDGE..." >&2; exit 2 ;;
esac
