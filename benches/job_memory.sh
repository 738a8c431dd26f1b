#!/usr/bin/env bash
# Issue 13, H1: the server's memory while one user floods it with large jobs.
# Starts a release server (in memory, default job limits unless the caller's environment sets
# them), runs examples/job_flood.rs against it, and prints its JSON line.
#   benches/job_memory.sh            20,000 attempts of 100 KB summaries
#   benches/job_memory.sh --smoke    200 attempts, to prove the tooling works (CI)
#   SERVER=path/to/artifact-events benches/job_memory.sh   another build (e.g. an older commit)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=20000
[ "${1:-}" = "--smoke" ] && jobs=200
export JWT_SECRET="${JWT_SECRET:-bench-secret-$$-0123456789abcdef0123456789}"
cargo build --release --quiet --bin artifact-events --example job_flood
server="${SERVER:-target/release/artifact-events}"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
env -u REDIS_URL -u DATABASE_PATH LOG_LEVEL=warn "$server" --addr "127.0.0.1:$port" </dev/null 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.05
done
target/release/examples/job_flood --addr "127.0.0.1:$port" --pid "$pid" --jobs "$jobs"
