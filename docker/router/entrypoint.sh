#!/bin/sh
# NAT router for the compose lab: apply the NAT behaviour named by $NAT_TYPE with nftables,
# then idle. The rules are those of /work/shared/NATLAB.md (and docs/natlab.md), which were seen
# to work with aiortc in the network-namespace lab:
#
#   port-restricted  postrouting `oifname WAN masquerade`               (Linux default: one
#                    mapping for all destinations, port kept; only the exact address:port
#                    contacted gets back in)
#   symmetric        postrouting `oifname WAN masquerade fully-random`  (a new random port per
#                    destination: hole punching fails, TURN is needed)
#
# Both: forward accepts LAN->WAN and `ct state established,related`, nothing else; and an
# input chain with policy drop (trap 1 of NATLAB.md: without it a punch packet reaching the router
# creates a conntrack entry on the router itself, the router re-maps its own outbound port, and
# hole punching between two port-restricted NATs never completes).
#
# Environment:
#   NAT_TYPE   port-restricted | symmetric                      (required)
#   WAN_ADDR   this router's address on the "internet" network (e.g. 203.0.113.101)
#   LAN_ADDR   this router's address on its home network        (e.g. 10.0.1.1)
#   WAN_IF / LAN_IF  interface names, instead of finding them by address
# Docker does not promise which network becomes eth0 and which eth1, hence the look-up by address.
#
# `entrypoint.sh --print-rules` prints the ruleset (WAN_IF/LAN_IF default to wan/lan) and exits:
# the tests check it with `nft -c -f`.
# The ip_forward sysctl cannot be set from inside a container (/proc/sys is read-only): compose sets
# `net.ipv4.ip_forward: 1`; this script only checks it. Needs cap_add NET_ADMIN.
set -eu

log() { echo "router: $*" >&2; }
die() { log "error: $*"; exit 1; }

ruleset() {
    # $1 = WAN interface, $2 = LAN interface
    case "${NAT_TYPE:-}" in
        port-restricted) masq="masquerade" ;;
        symmetric) masq="masquerade fully-random" ;;
        *) die "NAT_TYPE must be port-restricted or symmetric, not '${NAT_TYPE:-}'" ;;
    esac
    # Own tables only: Docker's embedded-DNS rules in this namespace are left alone.
    # "add table" + "delete table" makes the load idempotent (a re-run replaces the tables).
    cat <<RULES
add table ip peerlearn_nat
delete table ip peerlearn_nat
add table inet peerlearn_filter
delete table inet peerlearn_filter

table ip peerlearn_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "$1" $masq
    }
}

table inet peerlearn_filter {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname "lo" accept
        iifname "$2" accept
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "$2" oifname "$1" accept
    }
}
RULES
}

iface_of() {
    # the interface that holds IPv4 address $1 (empty if none yet)
    ip -o -4 addr show | awk -v a="$1" '{ split($4, p, "/"); if (p[1] == a) { print $2; exit } }'
}

find_iface() {
    # $1 = address; waits up to 30 s: compose may connect the second network just after start
    i=0
    while [ "$i" -lt 30 ]; do
        name=$(iface_of "$1")
        if [ -n "$name" ]; then
            echo "$name"
            return 0
        fi
        i=$((i + 1))
        sleep 1
    done
    die "no interface holds $1 (is the router attached to that network with that ipv4_address?)"
}

if [ "${1:-}" = "--print-rules" ]; then
    ruleset "${WAN_IF:-wan}" "${LAN_IF:-lan}"
    exit 0
fi

wan=${WAN_IF:-}
lan=${LAN_IF:-}
if [ -z "$wan" ]; then
    [ -n "${WAN_ADDR:-}" ] || die "set WAN_ADDR (or WAN_IF)"
    wan=$(find_iface "$WAN_ADDR")
fi
if [ -z "$lan" ]; then
    [ -n "${LAN_ADDR:-}" ] || die "set LAN_ADDR (or LAN_IF)"
    lan=$(find_iface "$LAN_ADDR")
fi

if [ "$(cat /proc/sys/net/ipv4/ip_forward)" != 1 ]; then
    echo 1 > /proc/sys/net/ipv4/ip_forward 2>/dev/null \
        || die "net.ipv4.ip_forward is 0: add 'sysctls: {net.ipv4.ip_forward: 1}' to the service"
fi

rules=$(mktemp)
ruleset "$wan" "$lan" > "$rules"
nft -f "$rules" || die "nft rejected the rules (cap_add NET_ADMIN missing?)"
rm -f "$rules"
log "NAT_TYPE=$NAT_TYPE wan=$wan lan=$lan: rules applied"
nft list ruleset >&2
touch /run/nat-ready

# Idle until stopped; as PID 1 a plain `sleep` would ignore SIGTERM.
trap 'log "stopping"; exit 0' TERM INT
while :; do
    sleep 3600 &
    wait $! || true
done
