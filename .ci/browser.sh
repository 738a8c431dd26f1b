#!/usr/bin/env bash
# The demo page at / in a real browser: installs Debian's Chromium (and Node.js if missing),
# the browser test's npm packages exactly as package-lock.json pins them, builds the server
# with all features (the test needs SQLite; the HTTPS test, TLS), and runs tests/browser with
# node's test runner: the demo page (page.test.mjs), and ten EventSources over HTTPS with HTTP/2
# (https.test.mjs, which needs openssl).
# The test starts and stops its own servers; whatever is left of its process group is killed
# on exit. Screenshots of every step are kept in SCREENSHOT_DIR (a fresh temporary directory
# unless set), and the path is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never DEBIAN_FRONTEND=noninteractive
# The whole browser test (three servers, about twenty browser steps) must end within this.
limit_secs=300

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  apt-get install -y -qq "$@" >/dev/null
}
[ -x /usr/bin/chromium ] || apt_install chromium
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then apt_install nodejs npm; fi
echo "== browser test: $(/usr/bin/chromium --version 2>/dev/null | head -n 1), node $(node --version)"

(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
cargo build --all-features --bin artifact-events
export ARTIFACT_EVENTS_BIN="$PWD/target/debug/artifact-events"
export SCREENSHOT_DIR="${SCREENSHOT_DIR:-$(mktemp -d -t artifact-events-page-XXXXXX)}"

# timeout leads its own process group and, past the limit, signals all of it: node, the test
# file's process and the servers it started (Playwright closes Chromium on that signal).
timeout -k 10 "$limit_secs" node --test tests/browser/ &
test_pid=$!
trap 'kill -KILL -- "-$test_pid" 2>/dev/null || true' EXIT
status=0
wait "$test_pid" || status=$?
if [ "$status" -eq 0 ]; then
  echo "== browser test passed; screenshots in $SCREENSHOT_DIR"
else
  [ "$status" -eq 124 ] && echo "== browser test took over ${limit_secs}s and was stopped"
  echo "== browser test FAILED (exit $status); screenshots so far in $SCREENSHOT_DIR"
fi
exit "$status"
