#!/usr/bin/env bash
# Runs the README's performance scenarios against a release build and prints a table.
# The server runs pinned to CPU 0 and the load generator to CPU 1 (when there are two CPUs);
# every scenario gets a fresh server, so RSS figures start from the same baseline.
# The HTTP/2 scenarios (h2c, and one over HTTPS with a test certificate) multiplex 100 streams
# per connection, the server's SETTINGS_MAX_CONCURRENT_STREAMS.
#   benches/run.sh            the full scenarios (about 5 minutes)
#   benches/run.sh --smoke    tiny versions, to prove the tooling works (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true
export JWT_SECRET="${JWT_SECRET:-bench-secret-$$-0123456789abcdef0123456789}"
results=$(mktemp -d)
port=18400
server_pid=""

cargo build --release --quiet --features tls --bin artifact-events --example loadgen
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -keyout "$results/key.pem" -out "$results/cert.pem" -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
tls=(TLS_CERT_FILE="$results/cert.pem" TLS_KEY_FILE="$results/key.pem")
ulimit -n "$(ulimit -Hn)"
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  on_server_cpu=(taskset -c 0)
  on_load_cpu=(taskset -c 1)
else
  on_server_cpu=()
  on_load_cpu=()
fi

stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

# start_server [VAR=value ...]: a fresh server on the next port, waiting until it accepts.
start_server() {
  stop_server
  port=$((port + 1))
  # One process in memory: whatever Redis or database the caller's environment names is not
  # part of what these scenarios measure.
  env -u REDIS_URL -u DATABASE_PATH "$@" LOG_LEVEL=warn MAX_CONNECTIONS=100000 MAX_STREAMS_PER_USER=1000 \
    "${on_server_cpu[@]}" target/release/artifact-events --addr "127.0.0.1:$port" \
    </dev/null >/dev/null 2>>"$results/server.log" &
  server_pid=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server did not start; its log:" >&2
  cat "$results/server.log" >&2
  exit 1
}

# run NAME SCENARIO [loadgen options]: one loadgen run, its JSON line saved as NAME.
run() {
  local name=$1
  shift
  echo "== $name: loadgen $*" >&2
  "${on_load_cpu[@]}" target/release/examples/loadgen "$@" --addr "127.0.0.1:$port" --pid "$server_pid" \
    | tee "$results/$name.json"
}

if $smoke; then
  start_server; run idle idle --streams 100 --users 10
  start_server; run cost_10 cost --others 10 --events 500
  start_server; run cost_10000 cost --others 100 --events 500
  start_server; run publish publish --streams 100 --users 10 --rate 200 --seconds 1
  start_server; run ramp ramp --streams 100 --users 2 --start 50 --seconds 1
  start_server; run stalled stalled --streams 50 --events 2000
  start_server; run idle_h2 idle --streams 200 --users 10 --http2
  start_server; run publish_h2 publish --streams 100 --users 10 --rate 200 --seconds 1 --http2
  start_server; run ramp_h2 ramp --streams 100 --users 2 --start 50 --seconds 1 --step-percent 50 --http2
  start_server "${tls[@]}"; run publish_h2_tls publish --streams 100 --users 10 --rate 200 --seconds 1 --http2 --insecure
else
  start_server; run idle idle --streams 10000 --users 1000
  # Hyper's two 8 KiB buffers per connection are touched at both ends by glibc's allocator;
  # served by mmap instead, their untouched pages stay out of RSS.
  start_server GLIBC_TUNABLES=glibc.malloc.mmap_threshold=8192; run idle_mmap idle --streams 10000 --users 1000
  start_server; run cost_10 cost --others 10 --events 20000
  start_server; run cost_10000 cost --others 10000 --events 20000
  start_server; run publish publish --streams 10000 --users 1000 --rate 5000 --seconds 30
  start_server; run ramp ramp --streams 2000 --users 20 --start 1200 --seconds 4
  start_server; run stalled stalled --streams 1000 --events 1000000
  start_server; run idle_h2 idle --streams 10000 --users 1000 --http2
  start_server; run publish_h2 publish --streams 10000 --users 1000 --rate 5000 --seconds 30 --http2
  start_server; run ramp_h2 ramp --streams 2000 --users 20 --start 1200 --seconds 4 --http2
  start_server "${tls[@]}"; run publish_h2_tls publish --streams 10000 --users 1000 --rate 5000 --seconds 30 --http2 --insecure
fi
stop_server

python3 - "$results" "$smoke" <<'PY'
import json, os, sys
results, smoke = sys.argv[1], sys.argv[2] == "true"
def load(name):
    path = os.path.join(results, name + ".json")
    return json.load(open(path)) if os.path.exists(path) else {}
kib = lambda b: f"{b / 1024:.1f} KiB" if b is not None else "n/a"
idle, idle_mmap = load("idle"), load("idle_mmap")
cost_10, cost_many = load("cost_10"), load("cost_10000")
publish, ramp, stalled = load("publish").get("result", {}), load("ramp"), load("stalled")
best = ramp.get("best") or {}
idle_h2 = load("idle_h2")
publish_h2, publish_h2_tls = load("publish_h2").get("result", {}), load("publish_h2_tls").get("result", {})
best_h2 = load("ramp_h2").get("best") or {}
ratio = (cost_many.get("server_cpu_ns_per_publish") or 0) / max(cost_10.get("server_cpu_ns_per_publish") or 1, 1)
rows = [
    ("idle streams, RSS per stream", kib(idle.get("rss_bytes_per_stream"))
        + (f" ({kib(idle_mmap.get('rss_bytes_per_stream'))} with mmap_threshold=8192)" if idle_mmap else ""), "<= 12 KiB"),
    ("CPU per publish, 10 vs many other streams",
        f"{cost_10.get('server_cpu_ns_per_publish', 0) / 1000:.1f} / {cost_many.get('server_cpu_ns_per_publish', 0) / 1000:.1f} us = {ratio:.2f}x", "<= 1.2x"),
    ("publish->receive p50 / p99", f"{(publish.get('p50_us') or 0) / 1000:.2f} / {(publish.get('p99_us') or 0) / 1000:.2f} ms"
        f" at {publish.get('published_per_second', 0):.0f} events/s", "p99 <= 10 ms"),
    ("losses / leaks", f"{publish.get('losses')} / {publish.get('leaks')}", "0 / 0"),
    ("highest delivered events/s, p99 <= 100 ms", f"{best.get('delivered_per_second', 0):,.0f} (p99 {(best.get('p99_us') or 0) / 1000:.1f} ms)", ">= 160,000"),
    ("HTTP/2 idle streams (100 per connection), RSS per stream", kib(idle_h2.get("rss_bytes_per_stream")), "<= 4 KiB"),
    ("HTTP/2 publish->receive p50 / p99 (h2c)", f"{(publish_h2.get('p50_us') or 0) / 1000:.2f} / {(publish_h2.get('p99_us') or 0) / 1000:.2f} ms"
        f" = {(publish_h2.get('p99_us') or 0) / max(publish.get('p99_us') or 1, 1):.2f}x HTTP/1.1's p99; losses {publish_h2.get('losses')}", "<= 1.5x; 0"),
    ("HTTP/2 publish->receive p50 / p99 (HTTPS)", f"{(publish_h2_tls.get('p50_us') or 0) / 1000:.2f} / {(publish_h2_tls.get('p99_us') or 0) / 1000:.2f} ms"
        f"; losses {publish_h2_tls.get('losses')}", "0 losses"),
    ("HTTP/2 highest delivered events/s, p99 <= 100 ms", f"{best_h2.get('delivered_per_second', 0):,.0f} (p99 {(best_h2.get('p99_us') or 0) / 1000:.1f} ms)", "(HTTP/1.1 above)"),
    ("RSS growth, stalled clients", f"{(stalled.get('rss_growth') or 0) / 2**20:.1f} MiB after {stalled.get('events', 0):,} events", "<= 64 MiB"),
]
print(f"\n{'smoke run: ' if smoke else ''}figures (server on CPU 0, load on CPU 1)")
width = max(len(r[0]) for r in rows)
for name, figure, target in rows:
    print(f"  {name:<{width}}  {figure:<58} target {target}")
PY
