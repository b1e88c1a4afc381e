#!/usr/bin/env bash
# A million-connection `conn` run: shardmq-bench spreads the connections over several processes
# (each under its own descriptor limit) and several source addresses (each good for one port range
# of connections to one broker address), holds them, and reports connect rate, CONNACK latency,
# failures by cause and, with BROKER_PID, the broker's memory per connection.
#
# It checks first whether this machine can do it at all, and stops with the reason when it cannot:
# the broker is one process, so it needs CONNS descriptors under its own `ulimit -n`; both ends of
# every loopback connection need a descriptor system-wide; every source address gives one port
# range of connections.
#
# Settings (environment):
#   CONNS=1000000  HOST=127.0.0.1  PORT=1883  RATE=20000 (connects/s)  HOLD=30 (s)
#   SRC_ADDRS=127.0.0.1-127.0.0.64  PROCS (default: enough for the client-side ulimit)
#   BROKER_PID (the broker's pid: limits checked from /proc, RSS per connection reported)
#   BENCH (default: target/release/shardmq-bench)  MQTT=3.1.1  KEEP_ALIVE=300
#   FORCE=1 (run even when a check fails, to see how far it gets)
set -uo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-1000000}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-1883}
RATE=${RATE:-20000}
HOLD=${HOLD:-30}
SRC_ADDRS=${SRC_ADDRS:-127.0.0.1-127.0.0.64}
BENCH=${BENCH:-target/release/shardmq-bench}
MQTT=${MQTT:-3.1.1}
KEEP_ALIVE=${KEEP_ALIVE:-300}
BROKER_PID=${BROKER_PID:-}
FORCE=${FORCE:-0}
# Descriptors a bench process keeps for itself besides its connections (stdio, epoll, pipes).
RESERVE_FDS=200

problems=()
say() { echo "million: $*" >&2; }

# --- the broker's descriptor limit: it holds every connection in one process.
if [[ -n $BROKER_PID ]]; then
  broker_limit=$(awk '/^Max open files/ {print $4}' "/proc/$BROKER_PID/limits" 2>/dev/null)
  if [[ -z $broker_limit ]]; then
    problems+=("cannot read /proc/$BROKER_PID/limits: is BROKER_PID a running process?")
  elif [[ $broker_limit != unlimited && $broker_limit -lt $((CONNS + 100)) ]]; then
    problems+=("the broker (pid $BROKER_PID) may hold $broker_limit descriptors, fewer than $CONNS connections")
  fi
  say "broker pid $BROKER_PID: max open files ${broker_limit:-unknown}"
fi

# --- this shell's limit: a broker started from here inherits it; can it be raised?
soft=$(ulimit -Sn)
hard=$(ulimit -Hn)
say "this shell: ulimit -n soft $soft, hard $hard; fs.nr_open $(cat /proc/sys/fs/nr_open)"
if [[ $hard != unlimited && $hard -lt $((CONNS + 100)) ]]; then
  if (ulimit -Hn $((CONNS + 100))) 2>/dev/null; then
    say "the hard limit can be raised: run 'ulimit -n $((CONNS + 100))' before starting the broker"
  else
    problems+=("a process here is capped at $hard descriptors and the cap cannot be raised (not root, or fs.nr_open / a container limit): a single broker process cannot hold $CONNS connections")
  fi
fi
ulimit -Sn "$hard" 2>/dev/null || true
soft=$(ulimit -Sn)

# --- descriptors system-wide: both ends of each loopback connection.
file_max=$(cat /proc/sys/fs/file-max)
if [[ $file_max -lt $((2 * CONNS + 10000)) ]]; then
  problems+=("fs.file-max is $file_max, below the $((2 * CONNS + 10000)) that both ends need (scripts/tune-host.sh raises it)")
fi

# --- client side: processes so each stays under its own descriptor limit.
per_proc=$((soft - RESERVE_FDS))
if [[ $per_proc -lt 1 ]]; then
  problems+=("ulimit -n $soft leaves no descriptors for connections")
  per_proc=1
fi
PROCS=${PROCS:-$(((CONNS + per_proc - 1) / per_proc))}
if [[ $((CONNS / PROCS)) -gt $per_proc ]]; then
  problems+=("PROCS=$PROCS gives $((CONNS / PROCS)) connections per process, above its $per_proc usable descriptors")
fi
say "client: $PROCS processes of about $((CONNS / PROCS)) connections"

# --- source ports: one port range of connections per source address.
read -r port_low port_high < /proc/sys/net/ipv4/ip_local_port_range
ports=$((port_high - port_low + 1))
first=${SRC_ADDRS%%-*}
last=${SRC_ADDRS##*-}
ip_to_int() { local IFS=.; read -r a b c d <<< "$1"; echo $(((a << 24) + (b << 16) + (c << 8) + d)); }
addrs=$(($(ip_to_int "$last") - $(ip_to_int "$first") + 1))
say "source addresses: $addrs x $ports ports = $((addrs * ports)) connections at most"
if [[ $((addrs * ports)) -lt $CONNS ]]; then
  problems+=("$addrs source addresses x $ports ports ($port_low-$port_high) = $((addrs * ports)) < $CONNS: widen SRC_ADDRS or ip_local_port_range")
fi

# --- memory: roughly 4 KiB of kernel socket memory per end, and the broker's own share.
avail_kib=$(awk '/^MemAvailable/ {print $2}' /proc/meminfo)
need_kib=$((CONNS * 10))
say "memory: $((avail_kib / 1024)) MiB available, about $((need_kib / 1024)) MiB needed for sockets alone"
if [[ $avail_kib -lt $need_kib ]]; then
  problems+=("only $((avail_kib / 1024)) MiB available, about $((need_kib / 1024)) MiB needed")
fi

if [[ ! -x $BENCH ]]; then
  problems+=("$BENCH is not built: cargo build --release -p shardmq-bench")
fi

if [[ ${#problems[@]} -gt 0 ]]; then
  say "this machine cannot run $CONNS connections:"
  for problem in "${problems[@]}"; do say "  - $problem"; done
  if [[ $FORCE != 1 ]]; then
    say "stopping before any connection is made (FORCE=1 runs anyway)"
    exit 2
  fi
  say "FORCE=1: running anyway"
fi

args=(conn --host "$HOST" --port "$PORT" --mqtt "$MQTT" --keep-alive "$KEEP_ALIVE"
  --conns "$CONNS" --rate "$RATE" --procs "$PROCS" --src-addrs "$SRC_ADDRS" --hold "$HOLD"
  --connect-timeout 30)
[[ -n $BROKER_PID ]] && args+=(--broker-pid "$BROKER_PID")
say "running: $BENCH ${args[*]}"
"$BENCH" "${args[@]}"
