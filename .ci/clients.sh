#!/usr/bin/env bash
# Client examples: installs the Node client's locked packages (npm ci) and the Python client's
# pinned requirements (in a venv under target/), builds the server with SQLite, and runs
# tests/clients/check.py, which follows real jobs with both clients through a SIGKILL and
# restart of the server on the same database, then through a restart on an empty one, then
# through a token that expires mid-job (renewed with TOKEN_COMMAND).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi

echo "== clients: npm ci (examples/clients/node)"
(cd examples/clients/node && npm ci --no-audit --no-fund --loglevel=error)

echo "== clients: Python venv with examples/clients/python/requirements.txt"
venv=$PWD/target/clients-venv
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r examples/clients/python/requirements.txt

# The debug build with every feature is the one `cargo test --all-features` (and the browser
# test) already made: no second build of the server for this check.
echo "== clients: cargo build --all-features (sqlite)"
cargo build --quiet --all-features --bin artifact-events

work=$(mktemp -d)
check_pid=""
cleanup() {
  # The check stops its own server and clients; this covers it being interrupted.
  if [ -n "$check_pid" ]; then
    kill "$check_pid" 2>/dev/null || true
    wait "$check_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

timeout 300 python3 tests/clients/check.py --binary target/debug/artifact-events \
  --python "$venv/bin/python" --work "$work" &
check_pid=$!
wait "$check_pid"
