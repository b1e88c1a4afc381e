#!/usr/bin/env bash
# Tunes this host for connection-heavy benchmarks (shardmq-bench conn, scripts/million.sh).
#
# Raises the kernel limits that cap how many sockets a load test can open, and prints, for each,
# what it changed, what was already enough, and what it could not change (and why). The changes
# are runtime only (sysctl -w): nothing is written to /etc, so a reboot undoes them.
#
#   scripts/tune-host.sh            apply
#   scripts/tune-host.sh --dry-run  only show what would change
#
# The per-process descriptor limit (ulimit -n) belongs to the shell that starts the broker and the
# bench: this script reports how far it can be raised, and the line to run in that shell.
set -uo pipefail

dry_run=0
[[ "${1:-}" == "--dry-run" ]] && dry_run=1

changed=0
unchanged=0
failed=0

# set_sysctl KEY WANTED [COMPARE]: raise KEY to WANTED when it is lower (COMPARE=min) or differs
# (COMPARE=eq). Values with spaces (port ranges) are compared as strings.
set_sysctl() {
  local key=$1 wanted=$2 compare=${3:-min}
  local path=/proc/sys/${key//./\/}
  if [[ ! -r $path ]]; then
    echo "could not: $key does not exist on this kernel"
    failed=$((failed + 1))
    return
  fi
  local current
  current=$(tr -s '\t ' ' ' < "$path")
  if [[ $compare == min && $current =~ ^[0-9]+$ && $current -ge $wanted ]] \
    || [[ $compare == eq && "$current" == "$wanted" ]]; then
    echo "ok:      $key = $current"
    unchanged=$((unchanged + 1))
    return
  fi
  if ((dry_run)); then
    echo "would:   $key $current -> $wanted"
    return
  fi
  local error
  if error=$(sysctl -q -w "$key=$wanted" 2>&1); then
    echo "changed: $key $current -> $(tr -s '\t ' ' ' < "$path")"
    changed=$((changed + 1))
  else
    echo "could not: $key stays $current (wanted $wanted): ${error:-permission denied}"
    failed=$((failed + 1))
  fi
}

echo "== kernel limits"
set_sysctl fs.file-max 4194304              # descriptors system-wide (both ends of loopback count)
set_sysctl fs.nr_open 2097152               # the ceiling of any process's ulimit -n
set_sysctl net.core.somaxconn 65535         # accept queue: a storm overflows the default 4096
set_sysctl net.ipv4.tcp_max_syn_backlog 65535
set_sysctl net.core.netdev_max_backlog 65535
set_sysctl net.ipv4.ip_local_port_range "1024 65535" eq   # ~64k source ports per source address
set_sysctl net.ipv4.tcp_tw_reuse 1 eq       # reuse TIME_WAIT ports for new outgoing connections

echo "== descriptors per process (ulimit -n)"
soft=$(ulimit -Sn)
hard=$(ulimit -Hn)
nr_open=$(cat /proc/sys/fs/nr_open 2>/dev/null || echo unknown)
echo "current: soft $soft, hard $hard, fs.nr_open $nr_open"
target=$nr_open
[[ $target =~ ^[0-9]+$ ]] || target=1048576
if (ulimit -Hn "$target" && ulimit -Sn "$target") 2>/dev/null; then
  echo "can raise to $target: run 'ulimit -n $target' in the shell that starts the broker and the bench"
else
  echo "could not: this process cannot raise its hard limit above $hard"
  echo "  (not root, or a container/seccomp/systemd limit; for a login shell, /etc/security/limits.conf)"
  failed=$((failed + 1))
fi
if [[ $soft != "$hard" ]]; then
  echo "note: soft limit $soft is below the hard limit $hard: 'ulimit -n $hard' raises it without privileges"
fi

echo "== summary: $changed changed, $unchanged already enough, $failed could not"
((failed == 0))
