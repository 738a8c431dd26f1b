#!/usr/bin/env bash
# HTTP/2 with curl against the real binary (built with the tls feature): cleartext h2c with
# prior knowledge, and HTTPS with a test certificate where ALPN gives HTTP/2 to `--http2` and
# HTTP/1.1 to `--http1.1`. Each stream must get its connected frame and a published event.
# (Chromium over HTTPS with ten EventSources is tests/browser/https.test.mjs, run by
# .ci/browser.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
command -v curl >/dev/null && command -v openssl >/dev/null || {
  echo "h2.sh needs curl and openssl" >&2
  exit 1
}
curl --version | grep -q HTTP2 || { echo "this curl has no HTTP/2" >&2; exit 1; }

cargo build --features tls --bin artifact-events
binary=target/debug/artifact-events
work=$(mktemp -d -t artifact-events-h2-XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  jobs -p | xargs -r kill 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export JWT_SECRET="h2-check-$$-0123456789abcdef0123456789"
user_token=$("$binary" token h2-user)
publisher_token=$("$binary" token publisher --publisher)

# start [VAR=value ...]: the server on an ephemeral port; sets server_pid and base (its URL).
start() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  : >"$work/server.log"
  env -u REDIS_URL -u DATABASE_PATH "$@" ADDR=127.0.0.1:0 "$binary" 2>"$work/server.log" &
  server_pid=$!
  for _ in $(seq 100); do
    base=$(grep -o 'listening on https\?://[0-9.:]*' "$work/server.log" | cut -d' ' -f3 || true)
    [ -n "$base" ] && return 0
    sleep 0.1
  done
  cat "$work/server.log" >&2
  exit 1
}

# check NAME [curl options]: opens a stream with those options, publishes one event, and
# asserts the stream's protocol, its connected frame and the event.
check() {
  local name=$1 expected_version=$2
  shift 2
  local out="$work/$name.out"
  curl -sS -v -N --max-time 10 "$@" \
    -H "Authorization: Bearer $user_token" "$base/ai/artifact/events/stream" >"$out" 2>"$work/$name.err" &
  local stream_pid=$!
  for _ in $(seq 100); do grep -q '"type":"connected"' "$out" && break; sleep 0.05; done
  grep -q '"type":"connected"' "$out" || { echo "$name: no connected frame" >&2; cat "$out" "$work/$name.err" >&2; exit 1; }
  curl -sS --fail "$@" -X POST -H "Authorization: Bearer $publisher_token" \
    -H 'Content-Type: application/json' \
    -d '{"event_type":"artifact.completed","event_data":{"user_id":"h2-user","job_id":"'"$name"'"}}' \
    "$base/ai/events/publish" >/dev/null
  for _ in $(seq 100); do grep -q "\"job_id\":\"$name\"" "$out" && break; sleep 0.05; done
  grep -q "\"job_id\":\"$name\"" "$out" || { echo "$name: the event did not arrive" >&2; cat "$out" >&2; exit 1; }
  kill "$stream_pid" 2>/dev/null || true
  wait "$stream_pid" 2>/dev/null || true
  # curl -v shows the response's status line: `< HTTP/2 200` or `< HTTP/1.1 200`.
  grep -q "^< HTTP/$expected_version 200" "$work/$name.err" || {
    echo "$name: not HTTP/$expected_version" >&2
    cat "$work/$name.err" >&2
    exit 1
  }
  echo "== $name: HTTP/$expected_version stream got its connected frame and the event"
}

start
check h2c 2 --http2-prior-knowledge
check cleartext-http1 1.1 --http1.1

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -keyout "$work/key.pem" -out "$work/cert.pem" -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
start TLS_CERT_FILE="$work/cert.pem" TLS_KEY_FILE="$work/key.pem"
case "$base" in https://*) ;; *) echo "TLS server did not listen on https: $base" >&2; exit 1 ;; esac
check https-h2 2 --http2 --cacert "$work/cert.pem"
check https-http1 1.1 --http1.1 --cacert "$work/cert.pem"
# HTTP/2 over TLS can only come from ALPN; curl's log says so in as many words.
curl -sS -v --http2 --cacert "$work/cert.pem" "$base/healthz" >/dev/null 2>"$work/alpn.err"
grep -q 'ALPN: server accepted h2' "$work/alpn.err" || { cat "$work/alpn.err" >&2; exit 1; }
echo "== h2.sh passed"
