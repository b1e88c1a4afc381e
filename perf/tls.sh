#!/usr/bin/env bash
# Regenerates the "TLS" section of perf/RESULTS.md: shardmq against Mosquitto, each with one plain
# and one TLS listener, in one sitting: QoS 1 pairs throughput over TLS and over plain TCP, the
# connect rate over TLS (full handshakes per second), and the broker's idle memory per TLS
# connection (with the plain figures beside them).
# Usage: perf/tls.sh [--rounds N] [--duration SECS] [--conns N]
# Needs mosquitto, openssl and python3 on PATH. ~3 minutes on 2 cores with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=2
duration=5
conns=5000
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --conns) conns="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release -p shardmq -p shardmq-bench >&2
target="${CARGO_TARGET_DIR:-target}/release"
bench="$target/shardmq-bench"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP_WORK:-}" ] || rm -rf "$work"' EXIT
port=18950      # plain; the TLS listener is port + 1
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"

# A CA and a server certificate for localhost and 127.0.0.1 (ECDSA P-256, SHA-256), as a small
# deployment would have: the chain the server sends is the leaf alone.
openssl ecparam -name prime256v1 -genkey -noout -out "$work/ca.key" 2>/dev/null
openssl req -x509 -new -key "$work/ca.key" -sha256 -days 2 -subj "/CN=shardmq perf CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" -out "$work/ca.pem" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out "$work/server.ec.key" 2>/dev/null
openssl pkcs8 -topk8 -nocrypt -in "$work/server.ec.key" -out "$work/server.key"
openssl req -new -key "$work/server.key" -subj "/CN=localhost" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' > "$work/ext.cnf"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial -days 2 -sha256 \
  -extfile "$work/ext.cnf" -out "$work/server.pem" 2>/dev/null
# Mosquitto started as root drops to the mosquitto user before it reads them: a throwaway key.
chmod 755 "$work" && chmod 644 "$work"/*

cat > "$work/shardmq.toml" <<TOML
[[listeners]]
address = "127.0.0.1:$port"

[[listeners]]
address = "127.0.0.1:$((port + 1))"
kind = "tls"
cert_file = "$work/server.pem"
key_file = "$work/server.key"
TOML
cat > "$work/mosquitto.conf" <<CONF
per_listener_settings false
allow_anonymous true
max_connections -1
max_queued_messages 1000000
max_inflight_messages 1000
set_tcp_nodelay true
persistence false
log_dest stderr
log_type error
listener $port 127.0.0.1
listener $((port + 1)) 127.0.0.1
cafile $work/ca.pem
certfile $work/server.pem
keyfile $work/server.key
CONF
shardmq_cmd=("$target/shardmq" serve --config "$work/shardmq.toml" --admin-listen off --cores 2 --in-memory --log warn)
mosquitto_cmd=(mosquitto -c "$work/mosquitto.conf")

wait_port() { for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }
broker_pid=
start() {  # start <shardmq|mosquitto>: a fresh broker, its pid in $broker_pid
  if [ "$1" = shardmq ]; then "${shardmq_cmd[@]}" > "$work/$1.log" 2>&1 &
  else "${mosquitto_cmd[@]}" 2> "$work/$1.log" & fi
  broker_pid=$!
  wait_port $port && wait_port $((port + 1))
}
stop() { kill "$broker_pid"; wait "$broker_pid" || true; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime + stime of a process
tls_flags=(--tls --cafile "$work/ca.pem")
pick() {  # pick KEY...: the results fields of the JSON line on stdin, or the error
  python3 -c 'import json,sys
r=json.loads(sys.stdin.read())
if "error" in r: print("error: " + r["error"]); sys.exit()
r=r["results"]; print(" ".join(str(r.get(k, "-")) for k in sys.argv[1:]))' "$@"
}
pubsub=(pubsub --mode pairs --pubs 100 --subs 100 --qos 1 --duration "$duration")
# Unpaced, with a timeout long enough that a slow broker's queue of handshakes completes rather
# than failing: the rate is then connections / time to the last CONNACK.
conn=(conn --conns "$conns" --connect-timeout 60)

declare -A result   # result[<broker> <measure>] = "value ..." (pubsub: one line per round)
for broker in shardmq mosquitto; do
  # Memory per connection is only meaningful on a fresh broker, so each conn run gets one.
  for transport in tls plain; do
    start $broker
    flags=(); [ $transport = tls ] && flags=("${tls_flags[@]}")
    port_used=$port; [ $transport = tls ] && port_used=$((port + 1))
    ticks_before=$(cpu_ticks "$broker_pid")
    line=$("$bench" "${conn[@]}" --port $port_used "${flags[@]}" --broker-pid "$broker_pid" 2>/dev/null \
      | pick connect_rate_per_sec broker_rss_bytes_per_conn connected failed connack_latency_us_p50 connack_latency_us_p99)
    # The broker's CPU time per connection (connect, CONNACK and the disconnect at the end): unlike
    # the rate, it does not depend on how much of the 2 cores the load generator and others take.
    ticks=$(( $(cpu_ticks "$broker_pid") - ticks_before ))
    result[$broker conn $transport]="$line $(python3 -c "print(round($ticks * 1e6 / $(getconf CLK_TCK) / $conns))")"
    stop
  done
  start $broker
  # What the TLS listener negotiates with a stock client, and how many TLS 1.3 session tickets it
  # sends after the handshake (each costs the broker a key derivation, and a cache entry or an
  # encryption, on every connection).
  (sleep 1) | openssl s_client -connect 127.0.0.1:$((port + 1)) -CAfile "$work/ca.pem" -servername localhost -msg \
    > "$work/s_client.txt" 2>&1 || true
  result[$broker handshake]="$(grep -E '^(New,|Verify return code)' "$work/s_client.txt" | tr '\n' ' ')session tickets: $(grep -c 'NewSessionTicket' "$work/s_client.txt" || true)"
  stop
done
for round in $(seq 1 "$rounds"); do
  for broker in shardmq mosquitto; do
    start $broker
    for transport in plain tls; do
      flags=(); [ $transport = tls ] && flags=("${tls_flags[@]}")
      port_used=$port; [ $transport = tls ] && port_used=$((port + 1))
      line=$("$bench" "${pubsub[@]}" --port $port_used "${flags[@]}" 2>/dev/null \
        | pick delivered_msgs_per_sec latency_us_p50 latency_us_p99 loss)
      result[$broker pubsub $transport]+="$line"$'\n'
    done
    stop
  done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

# The table: pubsub figures are the mean over the rounds (each round's figures are listed below).
export RESULTS_TXT="$(for key in "${!result[@]}"; do printf '%s\t%s\n' "$key" "${result[$key]//$'\n'/;}"; done)"
table=$(python3 - <<'PY'
import os
res = {}
for line in os.environ["RESULTS_TXT"].splitlines():
    key, _, value = line.partition("\t")
    res[key] = [v.split() for v in value.split(";") if v.strip()]
def num(broker, key, index, default=None):
    rows = [r for r in res.get(f"{broker} {key}", []) if r and r[0] != "error:"]
    vals = [float(r[index]) for r in rows if len(r) > index and r[index] != "-"]
    return sum(vals) / len(vals) if vals else default
def fmt(v, digits=0):
    return "-" if v is None else f"{v:,.{digits}f}"
def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"
rows = [
    ("QoS 1 pairs over TLS, delivered msgs/s", "pubsub tls", 0, 0),
    ("QoS 1 pairs over plain TCP, delivered msgs/s", "pubsub plain", 0, 0),
    ("QoS 1 pairs over TLS, latency p50 us", "pubsub tls", 1, 0),
    ("QoS 1 pairs over TLS, latency p99 us", "pubsub tls", 2, 0),
    ("QoS 1 pairs over plain TCP, latency p99 us", "pubsub plain", 2, 0),
    ("TLS connect rate (full handshakes + CONNACK)/s", "conn tls", 0, 0),
    ("plain TCP connect rate/s", "conn plain", 0, 0),
    ("TLS connects failed (of each run's --conns)", "conn tls", 3, 0),
    ("TLS CONNACK latency p50 us", "conn tls", 4, 0),
    ("TLS CONNACK latency p99 us", "conn tls", 5, 0),
    ("broker CPU per TLS connection (connect to disconnect), us", "conn tls", 6, 0),
    ("broker CPU per plain connection, us", "conn plain", 6, 0),
    ("broker RSS per idle TLS connection, bytes", "conn tls", 1, 0),
    ("broker RSS per idle plain connection, bytes", "conn plain", 1, 0),
]
print("| measure | shardmq | mosquitto | ratio (shardmq/mosquitto) |")
print("|---|---:|---:|---:|")
for title, key, index, digits in rows:
    s, m = num("shardmq", key, index), num("mosquitto", key, index)
    print(f"| {title} | {fmt(s, digits)} | {fmt(m, digits)} | {ratio(s, m)} |")
for broker in ("shardmq", "mosquitto"):
    for transport in ("tls", "plain"):
        failed = num(broker, f"conn {transport}", 3)
        if failed:
            print()
            print(f"Note: {failed:,.0f} {transport} connects to {broker} failed (see `failures` in a rerun for"
                  " the cause; 60 s timeout). The connect rate is connections / time to the last CONNACK, so"
                  " a broker that leaves some handshakes waiting has a rate set by its stragglers (see its"
                  " CONNACK p99); its CPU per connection is the steadier figure.")
print()
print("TLS / plain, per broker (same broker, same sitting):")
print()
print("| measure | shardmq TLS/plain | mosquitto TLS/plain |")
print("|---|---:|---:|")
for title, key, index in [
    ("QoS 1 pairs delivered msgs/s", "pubsub", 0),
    ("QoS 1 pairs latency p99", "pubsub", 2),
    ("connect rate", "conn", 0),
    ("broker CPU per connection", "conn", 6),
    ("RSS per idle connection", "conn", 1),
]:
    cells = [ratio(num(b, f"{key} tls", index), num(b, f"{key} plain", index)) for b in ("shardmq", "mosquitto")]
    print(f"| {title} | {cells[0]} | {cells[1]} |")
PY
)
raw=$(for key in "shardmq pubsub plain" "shardmq pubsub tls" "mosquitto pubsub plain" "mosquitto pubsub tls"; do
        printf '%s (msgs/s p50 p99 loss, per round): %s\n' "$key" "$(printf '%s' "${result[$key]}" | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
      done
      for key in "shardmq conn tls" "shardmq conn plain" "mosquitto conn tls" "mosquitto conn plain"; do
        printf '%s (rate/s rss/conn connected failed connack_p50 connack_p99 broker_cpu_us/conn): %s\n' "$key" "${result[$key]}"
      done
      for broker in shardmq mosquitto; do printf '%s handshake (openssl s_client): %s\n' $broker "${result[$broker handshake]}"; done)
section=$(cat <<MD
<!-- tls:begin (generated by perf/tls.sh; do not edit by hand) -->
## TLS

Generated by \`perf/tls.sh --rounds $rounds --duration $duration --conns $conns\` on $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD),
\`nproc\` = $(nproc), kernel $(uname -r), CPU "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)".
Load average (1/5/15 min) before: $load_before; after: $load_after (the machine's 2 cores are shared
with other builds and benchmarks, and the load generator runs on them too, doing its own half of
every handshake and all the client-side encryption).
Brokers, one at a time, each with a plain and a TLS listener on loopback: shardmq
\`serve --config <plain + tls listeners> --admin-listen off --cores 2 --in-memory\`;
$({ mosquitto -h 2>/dev/null || true; } | head -1) with \`listener\` + \`cafile\`/\`certfile\`/\`keyfile\`
and a plain listener (\`set_tcp_nodelay true\`, \`persistence false\`). Certificate: ECDSA P-256 leaf for
localhost and 127.0.0.1, signed by a CA generated by openssl for the run; the load generator
(\`--tls --cafile ca.pem\`, rustls 0.22, server name 127.0.0.1) verifies it on every connection and
never resumes a session, so every handshake is a full one.

- Throughput (a): \`shardmq-bench ${pubsub[*]} --port <plain|tls> [--tls --cafile ca.pem]\`, plain then
  TLS on the same broker process, $rounds rounds alternating the brokers; figures are the mean of the rounds.
- Connect rate (b) and memory (c): \`shardmq-bench ${conn[*]} --port <plain|tls> [--tls --cafile ca.pem] --broker-pid <pid>\`
  (unpaced), each on a freshly started broker: RSS after all are connected minus RSS before, per connection;
  broker CPU from \`/proc/<pid>/stat\` (utime + stime) over the run, per connection. The load generator
  spends CPU on its side of every handshake on the same cores, so the rate is bounded by both; the
  CPU per connection is the broker's own cost. Latency p99 varies by round under the shared load:
  see each run's figures below.

$table

Each run's figures:

\`\`\`
$raw
\`\`\`
<!-- tls:end -->
MD
)
printf '%s\n' "$section" > "$work/section.md"
python3 perf/section.py tls "$work/section.md"
echo "$section"
