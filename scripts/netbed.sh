#!/usr/bin/env bash
# Multi-host test bed: H simulated hosts on this machine, each a network
# namespace with its own hostname, joined by veth pairs through a bridge that
# lives in a namespace of its own. Nothing is created in the root namespace and
# the only addresses are 198.18.0.0/15 ones inside the bed's namespaces, so beds
# of parallel tests cannot clash (each bed reuses the same addresses in its own
# namespaces). Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN), iproute2, tc and
# util-linux's unshare.
#
#   netbed.sh check                      "ok", or "skipped: <why>" and exit 2
#   netbed.sh up NAME H [RATE]           create bed NAME with hosts 0..H-1
#                                        (RATE e.g. 2gbit, 500mbit: per-host
#                                        limit in each direction, tc tbf)
#   netbed.sh down NAME                  remove the bed (idempotent)
#   netbed.sh exec NAME I CMD [ARG...]   run CMD "on" host I: in its netns, in
#                                        a fresh UTS namespace whose hostname
#                                        is NAME-hI (exec: CMD keeps the pid)
#   netbed.sh addr NAME I                print host I's address (198.18.0.<I+1>)
#   netbed.sh hostname NAME I            print host I's hostname (NAME-hI)
#   netbed.sh link NAME I down|up        cut / restore host I's link (the
#                                        bridge port goes down: packets are
#                                        dropped silently, no reset)
#   netbed.sh rate NAME I RATE|off       change host I's rate limit
#   netbed.sh run H [RATE] -- CMD...     up a bed named nb<pid>, run CMD in the
#                                        root namespace with NETBED_NAME,
#                                        NETBED_HOSTS and NETBED (this script)
#                                        exported, down on every exit path
#   netbed.sh gc                         remove beds whose owner process is gone
#   netbed.sh list                       the beds that exist
#
# Layout of bed NAME: namespaces NAME-br (bridge br0, ports p0..pH-1) and
# NAME-h0..NAME-hH-1 (eth0 = 198.18.0.<I+1>/24, lo up). NAME: 1-20 characters
# [A-Za-z0-9_]. The owner (NETBED_OWNER, default the caller's pid) is recorded
# under /run/flatshard-netbed so `gc` can clean up after a killed owner.
set -euo pipefail

STATE=/run/flatshard-netbed
die() { echo "netbed: $*" >&2; exit 1; }

valid_name() { [[ "$1" =~ ^[A-Za-z0-9_]{1,20}$ ]] || die "bed name '$1': want 1-20 characters [A-Za-z0-9_]"; }
valid_host() {
  [[ "$2" =~ ^[0-9]+$ ]] || die "host index '$2' is not a number"
  [ -e "/run/netns/$1-h$2" ] || die "bed $1 has no host $2"
}
addr_of() { echo "198.18.0.$(($1 + 1))"; }

# tbf needs a bucket of at least one GSO packet and ~10 ms of traffic.
burst_of() {
  local rate=$1 n unit bits
  [[ "$rate" =~ ^([0-9]+)(kbit|mbit|gbit)$ ]] || die "rate '$rate': want <n>kbit, <n>mbit or <n>gbit"
  n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]}
  case $unit in kbit) bits=$((n * 1000)) ;; mbit) bits=$((n * 1000000)) ;; gbit) bits=$((n * 1000000000)) ;; esac
  [ "$bits" -gt 0 ] || die "rate '$rate' is zero"
  local b=$((bits / 8 / 100))
  [ "$b" -lt 131072 ] && b=131072
  echo "$b"
}

set_rate() { # NAME I RATE|off
  local name=$1 i=$2 rate=$3
  if [ "$rate" = off ]; then
    ip -n "$name-h$i" link show eth0 >/dev/null
    tc -n "$name-h$i" qdisc del dev eth0 root 2>/dev/null || true
    tc -n "$name-br" qdisc del dev "p$i" root 2>/dev/null || true
    return
  fi
  local burst
  burst=$(burst_of "$rate")
  # egress of the host (upload) and of its bridge port (download)
  tc -n "$name-h$i" qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" latency 50ms
  tc -n "$name-br" qdisc replace dev "p$i" root tbf rate "$rate" burst "$burst" latency 50ms
}

down() {
  local name=$1 ns
  for ns in /run/netns/"$name"-h* /run/netns/"$name"-br; do
    [ -e "$ns" ] || continue
    ip netns del "$(basename "$ns")" 2>/dev/null || true
  done
  rm -f "$STATE/$name"
}

up() {
  local name=$1 hosts=$2 rate=${3:-}
  [[ "$hosts" =~ ^[0-9]+$ ]] && [ "$hosts" -ge 1 ] && [ "$hosts" -le 200 ] || die "hosts '$hosts': want 1..200"
  [ -z "$rate" ] || burst_of "$rate" >/dev/null
  [ ! -e "/run/netns/$name-br" ] || die "bed $name exists already"
  mkdir -p "$STATE"
  echo "${NETBED_OWNER:-$PPID} $hosts" >"$STATE/$name"
  # a failure or signal part-way leaves nothing behind
  trap 'down "$name"' EXIT
  trap 'exit 130' INT TERM HUP
  ip netns add "$name-br"
  ip -n "$name-br" link set lo up
  ip -n "$name-br" link add br0 type bridge
  ip -n "$name-br" link set br0 up
  local i
  for ((i = 0; i < hosts; i++)); do
    ip netns add "$name-h$i"
    ip -n "$name-h$i" link set lo up
    ip -n "$name-br" link add "p$i" type veth peer name eth0 netns "$name-h$i"
    ip -n "$name-br" link set "p$i" master br0 up
    ip -n "$name-h$i" addr add "$(addr_of "$i")/24" dev eth0
    ip -n "$name-h$i" link set eth0 up
    if [ -n "$rate" ]; then set_rate "$name" "$i" "$rate"; fi
  done
  trap - EXIT INT TERM HUP
}

check() {
  local why=""
  if [ "$(id -u)" -ne 0 ]; then
    why="not root (network namespaces need CAP_NET_ADMIN)"
  else
    local t
    for t in ip tc unshare; do command -v "$t" >/dev/null 2>&1 || { why="$t is not installed"; break; }; done
    if [ -z "$why" ]; then
      local probe="nbchk$$"
      if ! ip netns add "$probe" 2>/dev/null; then
        why="cannot create a network namespace (no CAP_NET_ADMIN / CAP_SYS_ADMIN?)"
      elif ! ip -n "$probe" link add br0 type bridge 2>/dev/null \
        || ! ip -n "$probe" link add v0 type veth peer name v1 2>/dev/null; then
        why="cannot create a bridge or veth pair in a namespace"
      elif ! ip netns exec "$probe" unshare --uts true 2>/dev/null; then
        why="cannot create a UTS namespace (unshare --uts)"
      fi
      ip netns del "$probe" 2>/dev/null || true
    fi
  fi
  if [ -n "$why" ]; then echo "skipped: $why"; exit 2; fi
  echo ok
}

gc() {
  [ -d "$STATE" ] || return 0
  local f owner
  for f in "$STATE"/*; do
    [ -e "$f" ] || continue
    read -r owner _ <"$f" || owner=""
    if [ -z "$owner" ] || ! kill -0 "$owner" 2>/dev/null; then down "$(basename "$f")"; fi
  done
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  check) check ;;
  up)
    [ $# -ge 2 ] || die "usage: netbed.sh up NAME H [RATE]"
    valid_name "$1"; up "$@" ;;
  down)
    [ $# -eq 1 ] || die "usage: netbed.sh down NAME"
    valid_name "$1"; down "$1" ;;
  exec)
    [ $# -ge 3 ] || die "usage: netbed.sh exec NAME I CMD [ARG...]"
    valid_name "$1"; valid_host "$1" "$2"
    ns="$1-h$2"; shift 2
    exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$ns" "$@" ;;
  addr)
    [ $# -eq 2 ] || die "usage: netbed.sh addr NAME I"
    valid_name "$1"; valid_host "$1" "$2"; addr_of "$2" ;;
  hostname)
    [ $# -eq 2 ] || die "usage: netbed.sh hostname NAME I"
    valid_name "$1"; valid_host "$1" "$2"; echo "$1-h$2" ;;
  link)
    [ $# -eq 3 ] && [[ "$3" =~ ^(up|down)$ ]] || die "usage: netbed.sh link NAME I down|up"
    valid_name "$1"; valid_host "$1" "$2"
    ip -n "$1-br" link set "p$2" "$3" ;;
  rate)
    [ $# -eq 3 ] || die "usage: netbed.sh rate NAME I RATE|off"
    valid_name "$1"; valid_host "$1" "$2"; set_rate "$@" ;;
  run)
    [ $# -ge 1 ] || die "usage: netbed.sh run H [RATE] -- CMD..."
    hosts=$1; shift
    rate=""
    if [ $# -gt 0 ] && [ "$1" != "--" ]; then rate=$1; shift; fi
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || die "usage: netbed.sh run H [RATE] -- CMD..."
    name="nb$$"
    NETBED_OWNER=$$ up "$name" "$hosts" "$rate"
    trap 'down "$name"' EXIT
    trap 'exit 130' INT TERM HUP
    export NETBED_NAME=$name NETBED_HOSTS=$hosts NETBED="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
    status=0
    "$@" || status=$?
    exit "$status" ;;
  gc) gc ;;
  list) [ -d "$STATE" ] && ls "$STATE" || true ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 1 ;;
esac
