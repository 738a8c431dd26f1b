#!/usr/bin/env bash
# The OpenAPI contract, checked twice: src/server/openapi.json is a valid OpenAPI 3.1 document
# (openapi-spec-validator), and the live server keeps it (schemathesis: no 5xx, every status,
# content type, header and body as documented, invalid input refused, valid input accepted).
# Two paths are left out: the stream, whose 200 never ends, and `POST /ai/dev/session`, which
# exists only in development mode while this server runs in production mode (every method
# answers 404 there). Their agreement with the router is the Rust test in
# src/server/router.rs, which runs in development mode.
#
# Installs into target/openapi-venv (Python from Debian if missing), builds the server with
# default features, starts it on a free loopback port, and stops it on exit. Exits non-zero on
# any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

SCHEMATHESIS_VERSION=4.32.5
VALIDATOR_VERSION=0.9.0
# Test cases per operation and phase: about half a minute of requests on 2 cores.
MAX_EXAMPLES=150
# Hard bounds, so that a hung server or client cannot hold CI.
SERVER_START_SECS=30
SCHEMATHESIS_SECS=300
REQUEST_TIMEOUT_SECS=5
# At least 32 bytes; the tokens below are signed with it.
export JWT_SECRET=openapi-contract-check-secret-0123456789

venv=$PWD/target/openapi-venv
work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== OpenAPI: Python tools (openapi-spec-validator $VALIDATOR_VERSION, schemathesis $SCHEMATHESIS_VERSION)"
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3 python3-venv >/dev/null
fi
stamp="$venv/.installed-$VALIDATOR_VERSION-$SCHEMATHESIS_VERSION"
# The stamp holds the venv's path: a venv's scripts name their interpreter by absolute path,
# so a target directory moved from another checkout needs a fresh one.
if [ "$(cat "$stamp" 2>/dev/null)" != "$venv" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "openapi-spec-validator==$VALIDATOR_VERSION" "schemathesis==$SCHEMATHESIS_VERSION"
  echo "$venv" >"$stamp"
fi

echo "== OpenAPI: validate src/server/openapi.json"
"$venv/bin/openapi-spec-validator" src/server/openapi.json

echo "== OpenAPI: build and start the server"
cargo build --quiet --bin artifact-events
binary="${CARGO_TARGET_DIR:-target}/debug/artifact-events"
# Only what this check sets: CI exports REDIS_URL for other steps, and a default build refuses it.
env -u REDIS_URL -u DATABASE_PATH -u LOG_FORMAT -u LOG_LEVEL ADDR=127.0.0.1:0 \
  "$binary" 2>"$work/server.log" &
server_pid=$!
addr=
for _ in $(seq $((SERVER_START_SECS * 10))); do
  addr=$(sed -n 's/.*listening on http:\/\/\([0-9.:]*\).*/\1/p' "$work/server.log" | head -n 1)
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; echo "FAIL: the server exited"; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/server.log"; echo "FAIL: the server did not listen within ${SERVER_START_SECS}s"; exit 1; }
echo "server on http://$addr"

USER_TOKEN=$("$binary" token openapi-user --ttl 3600)
PUBLISHER_TOKEN=$("$binary" token openapi-publisher --publisher --ttl 3600)
export USER_TOKEN PUBLISHER_TOKEN
# Every operation with the user's bearer token, but publishing, which needs the publisher role.
cat >"$work/schemathesis.toml" <<'EOF'
headers = { Authorization = "Bearer ${USER_TOKEN}" }

[[operations]]
include-path = "/ai/events/publish"
headers = { Authorization = "Bearer ${PUBLISHER_TOKEN}" }
EOF
# Whether a webhook URL is accepted depends on what its host resolves to now (only public
# addresses), which no schema can state: for registering a webhook, a schema-valid body may be
# refused with 422. Schemathesis applies an operation's check settings to every operation, so
# that one runs on its own, with this configuration (and without the stateful phase, whose
# links lead to operations this run leaves out; the first run has them).
cp "$work/schemathesis.toml" "$work/webhooks.toml"
cat >>"$work/webhooks.toml" <<'EOF'

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "409", "422"]
EOF

echo "== OpenAPI: schemathesis against the live server ($MAX_EXAMPLES examples per operation)"
checks=not_a_server_error,status_code_conformance,content_type_conformance
checks+=,response_schema_conformance,response_headers_conformance
checks+=,negative_data_rejection,positive_data_acceptance,missing_required_header
checks+=,unsupported_method,allow_header_conformance,ignored_auth
checks+=,use_after_free,ensure_resource_availability
status=0
# In a scratch directory: schemathesis leaves nothing in the repository.
(cd "$work" && timeout "$SCHEMATHESIS_SECS" "$venv/bin/schemathesis" \
  --config-file "$work/schemathesis.toml" run "http://$addr/openapi.json" \
  --url "http://$addr" \
  --exclude-path /ai/artifact/events/stream \
  --exclude-path /ai/dev/session \
  --exclude-operation-id createWebhook \
  --checks "$checks" \
  --max-examples "$MAX_EXAMPLES" \
  --request-timeout "$REQUEST_TIMEOUT_SECS" \
  --wait-for-schema 10 \
  --generation-database none \
  --no-color) >"$work/schemathesis.out" 2>&1 || status=$?
cat "$work/schemathesis.out"
(cd "$work" && timeout "$SCHEMATHESIS_SECS" "$venv/bin/schemathesis" \
  --config-file "$work/webhooks.toml" run "http://$addr/openapi.json" \
  --url "http://$addr" \
  --include-operation-id createWebhook \
  --phases examples,coverage,fuzzing \
  --checks "$checks" \
  --max-examples "$MAX_EXAMPLES" \
  --request-timeout "$REQUEST_TIMEOUT_SECS" \
  --generation-database none \
  --no-color) >"$work/webhooks.out" 2>&1 || status=$?
cat "$work/webhooks.out"

if grep -q "panicked" "$work/server.log"; then
  grep -B2 -A5 "panicked" "$work/server.log"
  echo "FAIL: the server logged a panic"
  status=1
fi
summary=$(grep -h -A1 "^Test cases:" "$work/schemathesis.out" "$work/webhooks.out" | grep -v "^Test cases:\|^--" | sed 's/^ *//' | paste -sd ';' - || true)
echo "== schemathesis: ${summary:-no summary}; $(grep -E '^=+ .* in [0-9.]+s =+$' "$work/schemathesis.out" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')"
if [ "$status" -ne 0 ]; then
  echo "FAIL: .ci/openapi.sh (schemathesis exit status $status)"
  exit 1
fi
echo "OK: .ci/openapi.sh: the document is valid and the live server keeps it"
