#!/usr/bin/env bash
# Webhooks and voice notifications, the parts that need tools from outside Rust:
# 1. the signature verified by an independent implementation of Standard Webhooks: the
#    `standardwebhooks` package from PyPI (in target/webhooks-venv), called by the receiver
#    script tests/webhooks/verify_receiver.py from the Rust test that needs it;
# 2. examples/voice_notifier.rs with espeak-ng (from Debian; .ci/run installs it): a completed
#    job of a user with a voice session gives a non-empty WAV of plausible duration, a user
#    without one gets none, and the session API opens and closes sessions.
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

STANDARDWEBHOOKS_VERSION=1.1.0
SERVER_START_SECS=60
JOB_SECS=30
venv=target/webhooks-venv
work=$(mktemp -d)
notifier_pid=
cleanup() {
  if [ -n "$notifier_pid" ]; then
    kill "$notifier_pid" 2>/dev/null || true
    wait "$notifier_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== webhooks: standardwebhooks $STANDARDWEBHOOKS_VERSION from PyPI"
stamp="$venv/.installed-$STANDARDWEBHOOKS_VERSION"
if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "standardwebhooks==$STANDARDWEBHOOKS_VERSION"
  touch "$stamp"
fi

echo "== webhooks: the signature, verified by the standardwebhooks package"
STANDARDWEBHOOKS_PYTHON="$PWD/$venv/bin/python" cargo test --all-features --test webhooks \
  the_signature_verifies_with_the_standardwebhooks_package -- --exact --nocapture \
  2>&1 | tee "$work/verify.out"
grep -q "skipped" "$work/verify.out" && { echo "FAIL: the verification was skipped"; exit 1; }
grep -q "test result: ok. 1 passed" "$work/verify.out" || { echo "FAIL: the verification test did not pass"; exit 1; }

echo "== voice notifier: espeak-ng into WAV files"
command -v espeak-ng >/dev/null || { echo "FAIL: espeak-ng is not installed (.ci/run installs it)"; exit 1; }
cargo build --quiet --bin artifact-events --example voice_notifier
target_dir="${CARGO_TARGET_DIR:-target}"
binary="$target_dir/debug/artifact-events"
export JWT_SECRET=voice-notifier-check-secret-0123456789
env -u REDIS_URL -u DATABASE_PATH -u GENERATOR ADDR=127.0.0.1:0 \
  "$target_dir/debug/examples/voice_notifier" --wav-dir "$work/wav" --session alice \
  --sessions-addr 127.0.0.1:0 2>"$work/notifier.log" &
notifier_pid=$!
addr=
sessions=
for _ in $(seq $((SERVER_START_SECS * 10))); do
  addr=$(sed -n 's/.*listening on http:\/\/\([0-9.:]*\).*/\1/p' "$work/notifier.log" | head -n 1)
  sessions=$(sed -n 's/^voice sessions on http:\/\/\([0-9.:]*\).*/\1/p' "$work/notifier.log" | head -n 1)
  [ -n "$addr" ] && [ -n "$sessions" ] && break
  kill -0 "$notifier_pid" 2>/dev/null || { cat "$work/notifier.log"; echo "FAIL: the notifier exited"; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/notifier.log"; echo "FAIL: the notifier did not listen"; exit 1; }

content="Photosynthesis is the process by which green plants convert light energy into chemical energy. It takes place mainly in the chloroplasts of leaf cells. Chlorophyll absorbs red and blue light. Water molecules are split and oxygen is released. The Calvin cycle builds glucose from carbon dioxide."
# Queues a job for user $1 of type $2, waits until it completed, and prints its id.
complete_job() {
  local token job status
  token=$("$binary" token "$1")
  job=$(curl -sf -X POST "http://$addr/ai/artifact/generate" -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' \
    -d "{\"notebook_id\":\"nb\",\"artifact_type\":\"$2\",\"content\":\"$content\"}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["job_id"])')
  for _ in $(seq $((JOB_SECS * 10))); do
    status=$(curl -sf "http://$addr/ai/artifact/jobs/$job" -H "Authorization: Bearer $token" |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')
    [ "$status" = completed ] && { echo "$job"; return; }
    sleep 0.1
  done
  echo "FAIL: job $job of $1 did not complete (status $status)" >&2
  exit 1
}
# Waits until the speaker has written $1.wav (it speaks in completion order).
wait_for_wav() {
  for _ in $(seq $((JOB_SECS * 10))); do
    [ -s "$work/wav/$1.wav" ] && grep -q "into $work/wav/$1.wav" "$work/notifier.log" && return
    sleep 0.1
  done
  cat "$work/notifier.log"
  echo "FAIL: no WAV for job $1"
  exit 1
}
# Checks that $1.wav is a WAV of 0.5 to 5 seconds (a short sentence).
check_wav() {
  python3 - "$work/wav/$1.wav" <<'PY'
import sys, wave
with wave.open(sys.argv[1]) as audio:
    seconds = audio.getnframes() / audio.getframerate()
print(f"{sys.argv[1]}: {seconds:.2f} s at {audio.getframerate()} Hz")
assert 0.5 <= seconds <= 5, f"implausible duration {seconds:.2f} s"
PY
}

bob_job=$(complete_job bob flashcards)
alice_job=$(complete_job alice quiz)
wait_for_wav "$alice_job"
check_wav "$alice_job"
grep -q "said \"Your quiz is ready\" into" "$work/notifier.log" || { echo "FAIL: not the expected words"; exit 1; }
# Speech runs in completion order: alice's WAV exists, so bob's job, earlier, was decided.
[ ! -e "$work/wav/$bob_job.wav" ] || { echo "FAIL: bob has no session, yet got a WAV"; exit 1; }

curl -sf -X PUT "http://$sessions/voice/sessions/bob" >/dev/null
curl -sf -X DELETE "http://$sessions/voice/sessions/alice" >/dev/null
[ "$(curl -sf "http://$sessions/voice/sessions")" = '["bob"]' ] || { echo "FAIL: the session list"; exit 1; }
alice_again=$(complete_job alice quiz)
bob_again=$(complete_job bob flashcards)
wait_for_wav "$bob_again"
check_wav "$bob_again"
[ ! -e "$work/wav/$alice_again.wav" ] || { echo "FAIL: alice's session was closed, yet she got a WAV"; exit 1; }
[ "$(ls "$work/wav" | wc -l)" -eq 2 ] || { ls "$work/wav"; echo "FAIL: expected exactly two WAV files"; exit 1; }
echo "OK: .ci/webhooks.sh: standardwebhooks verifies the signature; voice WAVs only for users with a session"
