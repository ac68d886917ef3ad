#!/bin/sh
# as-gdoid.sh COMMAND ARGS...: exec COMMAND as the image's user gdoid, keeping
# only the capabilities in AS_GDOID_CAPS (default net_admin,net_raw) as
# ambient capabilities, with no_new_privs.
#
# Docker 20.10 gives a non-root container user no capabilities at all (it sets
# no ambient set), so a GM with the data path starts as uid 0 with exactly
# NET_ADMIN, NET_RAW, SETUID and SETGID, fixes its network (netinit.sh) and
# switches to gdoid here.  setpriv keeps the listed capabilities across the
# uid change (PR_SET_KEEPCAPS) and raises them as ambient, so the gdoid
# process (a plain python, no file capabilities) has them effective:
# /dev/net/tun (TUNSETIFF), raw ESP sockets, routes and rules.
set -eu
caps=${AS_GDOID_CAPS:-net_admin,net_raw}
plus=$(echo "$caps" | sed 's/[^,][^,]*/+&/g')
[ $# -gt 0 ] || { echo "as-gdoid: no command" >&2; exit 2; }
# Docker copies the host's mode of /dev/net/tun, 0600 on some hosts: give the
# container's node the usual 0666 (root owns it here, so no capability is
# needed).  Opening it grants nothing by itself: creating an interface
# (TUNSETIFF) still needs CAP_NET_ADMIN.
if [ -c /dev/net/tun ]; then
    chmod 0666 /dev/net/tun
fi
exec setpriv --reuid=gdoid --regid=gdoid --init-groups --no-new-privs \
    --inh-caps="-all,$plus" --ambient-caps="-all,$plus" "$@"
