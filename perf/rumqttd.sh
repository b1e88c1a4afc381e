#!/usr/bin/env bash
# Starts rumqttd (the Rust broker people would pick instead of shardmq) for `shardmq-bench compare`:
# writes a config with an MQTT 3.1.1 listener on PORT into DIR, then execs rumqttd.
# Usage: perf/rumqttd.sh PORT DIR   (rumqttd from PATH; `cargo install rumqttd` puts it there)
set -euo pipefail
port="$1"
dir="$2"
cat > "$dir/rumqttd.toml" <<CONF
id = 0

[router]
id = 0
max_connections = 30000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:$port"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 1000
    dynamic_filters = true
CONF
exec rumqttd -q -c "$dir/rumqttd.toml"
