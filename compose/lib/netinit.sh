#!/bin/sh
# netinit.sh [COMMAND ARGS...]: fix up a container's network, then exec COMMAND.
#
# Docker attaches a container's networks in no fixed order, so "eth0" may be
# any of them.  NETINIT_IFACES="eth0=198.18.48.21 eth1=10.48.1.2" renames
# (swapping names if needed) so that each address sits on the named interface;
# the gdoid configs can then say wan_interface = "eth0".
# NETINIT_ROUTES="10.48.2.0/24 via 198.18.48.22, default via 10.48.1.2" adds
# routes (comma-separated `ip route replace` arguments).
# Needs CAP_NET_ADMIN and iproute2.
set -eu

die() { echo "netinit: $*" >&2; exit 1; }

iface_of() {  # the interface holding IPv4 address $1
    ip -o -4 addr show | awk -v a="$1" '{ split($4, p, "/"); if (p[1] == a) { sub(/@.*/, "", $2); print $2; exit } }'
}

for spec in ${NETINIT_IFACES:-}; do
    want=${spec%%=*}
    addr=${spec#*=}
    cur=$(iface_of "$addr")
    [ -n "$cur" ] || die "no interface has address $addr"
    [ "$cur" = "$want" ] && continue
    ip link set dev "$cur" down
    if ip link show dev "$want" >/dev/null 2>&1; then
        ip link set dev "$want" down
        ip link set dev "$want" name netinit-tmp
        ip link set dev "$cur" name "$want"
        ip link set dev netinit-tmp name "$cur"
        ip link set dev "$cur" up
    else
        ip link set dev "$cur" name "$want"
    fi
    ip link set dev "$want" up
    echo "netinit: $addr is on $want (was $cur)"
done

if [ -n "${NETINIT_ROUTES:-}" ]; then
    old_ifs=$IFS
    IFS=,
    for route in $NETINIT_ROUTES; do
        IFS=$old_ifs
        # shellcheck disable=SC2086
        ip route replace $route || die "ip route replace $route failed"
        echo "netinit: route $route"
        IFS=,
    done
    IFS=$old_ifs
fi

[ $# -gt 0 ] || exit 0
exec "$@"
