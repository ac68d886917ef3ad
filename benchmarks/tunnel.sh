#!/usr/bin/env bash
# Userspace ESP tunnel throughput: iperf3 TCP and UDP hostA -> hostB through two GMs
# (network namespaces), with the real AES-GCM-256 Dataplane and with NullDataplane over
# the same TUN / policy-routing setup, in one run.  Prints both and the ratio
# (target: crypto >= 0.7 x no-crypto for TCP).  Needs root, iproute2 and iperf3.
#
#   benchmarks/tunnel.sh [--seconds 10] [--transform esp-gcm-256] [--crypto gcm] [--baseline null] [--family 4|both]
# --family both (default) measures IPv6 (ESP over IPv6) beside IPv4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v iperf3 >/dev/null || { echo "tunnel.sh: iperf3 is not installed (apt-get install iperf3)" >&2; exit 2; }
command -v ip >/dev/null || { echo "tunnel.sh: iproute2 is not installed" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "tunnel.sh: needs root (network namespaces, TUN)" >&2; exit 2; }
exec "$PY" benchmarks/tunnel.py "$@"
