#!/usr/bin/env bash
# Jobs across processes (README "Jobs across processes"): job throughput with the offline
# generator on one and two server processes sharing a Redis, and the takeover time after a
# SIGKILL. Starts its own redis-server and servers; prints one line per figure.
#   benches/redis_jobs.sh [--jobs N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --features redis --bin artifact-events --example job_throughput
target/release/examples/job_throughput --binary target/release/artifact-events "$@"
