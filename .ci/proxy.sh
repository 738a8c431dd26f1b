#!/usr/bin/env bash
# Reverse proxies: the server behind Debian's nginx and Caddy, each running the configuration
# in examples/proxy/ (the file the README quotes) with only its ports, the server's address and
# the certificate paths rewritten. tests/proxy/check.py then checks, through each proxy, that
# events arrive unbuffered, keepalives pass and Last-Event-ID replays; through nginx also over
# HTTP/2 with TLS (a self-signed certificate made here). No system service is used: each proxy
# runs in the foreground from a temporary directory and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

missing=()
for tool in nginx curl openssl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ] || ! command -v caddy >/dev/null 2>&1; then
  apt-get update -qq
  # Debian 12 has Caddy; on a release without it, only nginx is tested.
  caddy_candidate=$(apt-cache policy caddy | awk '/Candidate:/ {print $2}')
  if ! command -v caddy >/dev/null 2>&1 && [ -n "$caddy_candidate" ] && [ "$caddy_candidate" != "(none)" ]; then
    missing+=(caddy)
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

echo "== proxy: the README quotes examples/proxy/ word for word"
python3 - <<'PY'
import sys
readme = open("README.md").read()
stale = [name for name in ("examples/proxy/nginx.conf", "examples/proxy/Caddyfile")
         if "```\n" + open(name).read() + "```" not in readme.replace("```nginx\n", "```\n").replace("```caddy\n", "```\n")]
for name in stale:
    print(f"FAILED: README.md's snippet differs from {name}; copy the file into the README")
sys.exit(1 if stale else 0)
PY

echo "== proxy: cargo build --release (default features)"
cargo build --release --quiet --bin artifact-events
binary=target/release/artifact-events

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for NAME PORT LOG: until PORT accepts connections (10 s at most).
wait_for() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "FAILED: $1 did not start listening on port $2; its log:"
  cat "$3"
  exit 1
}

# rewrite FILE PATTERN REPLACEMENT: sed, failing when the pattern is not in the file, so that a
# change to the documented configuration cannot silently leave a setting untested.
rewrite() {
  if ! grep -qF -- "$2" "$1"; then
    echo "FAILED: '$2' is no longer in $1's documented configuration; update .ci/proxy.sh"
    exit 1
  fi
  local file=$1 from=$2 to=$3
  python3 -c 'import sys; p, a, b = sys.argv[1:]; s = open(p).read(); open(p, "w").write(s.replace(a, b))' \
    "$file" "$from" "$to"
}

export JWT_SECRET=proxy-check-secret-0123456789abcdef0123
server_port=$(free_port)
env -u REDIS_URL -u DATABASE_PATH SSE_KEEPALIVE_SECS=1 LOG_LEVEL=warn \
  "$binary" --addr "127.0.0.1:$server_port" </dev/null 2>"$work/server.log" &
pids+=($!)
wait_for server "$server_port" "$work/server.log"
publisher_token=$("$binary" token svc --publisher)

passed=0
failed=0
# check NAME URL [check.py options]: runs the checks through one proxy as user NAME.
check() {
  local name=$1 url=$2
  shift 2
  echo "== proxy: $name"
  if timeout 120 python3 tests/proxy/check.py --url "$url" --user "proxy-$name" \
    --token "$("$binary" token "proxy-$name")" --publisher-token "$publisher_token" "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "-- the server's log:"
    cat "$work/server.log"
  fi
}

# nginx: the documented file is included in the http block of a minimal main configuration
# that keeps the pid file, logs and temporary files in the work directory.
mkdir -p "$work/nginx"
nginx_port=$(free_port)
nginx_tls_port=$(free_port)
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 \
  -keyout "$work/nginx/key.pem" -out "$work/nginx/cert.pem" 2>/dev/null
site=$work/nginx/artifact-events.conf
cp examples/proxy/nginx.conf "$site"
rewrite "$site" "listen 80;" "listen 127.0.0.1:$nginx_port;"
rewrite "$site" "listen 443 ssl http2;" "listen 127.0.0.1:$nginx_tls_port ssl http2;"
rewrite "$site" "server 127.0.0.1:8000;" "server 127.0.0.1:$server_port;"
rewrite "$site" "/etc/ssl/certs/example.com.pem" "$work/nginx/cert.pem"
rewrite "$site" "/etc/ssl/private/example.com.key" "$work/nginx/key.pem"
cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 256; }
http {
    access_log $work/nginx/access.log;
    client_body_temp_path $work/nginx/client_body;
    proxy_temp_path $work/nginx/proxy;
    fastcgi_temp_path $work/nginx/fastcgi;
    uwsgi_temp_path $work/nginx/uwsgi;
    scgi_temp_path $work/nginx/scgi;
    include $site;
}
EOF
nginx_args=(-p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log")
nginx -t -q "${nginx_args[@]}"
nginx "${nginx_args[@]}" 2>>"$work/nginx/error.log" &
pids+=($!)
wait_for nginx "$nginx_port" "$work/nginx/error.log"
check nginx "http://127.0.0.1:$nginx_port" --h2-url "https://127.0.0.1:$nginx_tls_port"

# Caddy: the documented site on plain HTTP (no certificate to obtain), with a global block in
# front that turns off its admin endpoint and keeps its files in the work directory.
if command -v caddy >/dev/null 2>&1; then
  mkdir -p "$work/caddy"
  caddy_port=$(free_port)
  cp examples/proxy/Caddyfile "$work/caddy/site"
  rewrite "$work/caddy/site" "example.com {" "http://127.0.0.1:$caddy_port {"
  rewrite "$work/caddy/site" "reverse_proxy 127.0.0.1:8000" "reverse_proxy 127.0.0.1:$server_port"
  {
    printf '{\n\tadmin off\n\tstorage file_system %s\n}\n\n' "$work/caddy/storage"
    cat "$work/caddy/site"
  } >"$work/caddy/Caddyfile"
  HOME=$work/caddy XDG_CONFIG_HOME=$work/caddy XDG_DATA_HOME=$work/caddy \
    caddy run --config "$work/caddy/Caddyfile" --adapter caddyfile </dev/null 2>"$work/caddy/caddy.log" &
  pids+=($!)
  wait_for caddy "$caddy_port" "$work/caddy/caddy.log"
  check caddy "http://127.0.0.1:$caddy_port"
else
  echo "== proxy: caddy is not in this system's package lists; nginx only"
fi

echo "proxy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
