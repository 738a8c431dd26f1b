#!/usr/bin/env bash
# Dependency checks with cargo-deny (configured in deny.toml): `bans` always; `advisories`
# whenever the RustSec advisory database can be fetched (it is a git repository on GitHub).
# A machine that reaches only the package registries cannot fetch it: the script then says so
# loudly, in the output and in its exit line, instead of reporting the advisories as checked.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$PWD/target/ci-tools"
if [ ! -x "$tools/bin/cargo-deny" ]; then
  cargo install --quiet --locked --root "$tools" cargo-deny --version 0.20.2
fi
export PATH="$tools/bin:$PATH"
cargo deny --version
cargo deny check bans
if cargo deny fetch >/dev/null 2>&1; then
  cargo deny check --disable-fetch advisories
  echo "cargo deny: bans and advisories checked"
else
  echo "== WARNING: the RustSec advisory database (github.com/RustSec/advisory-db) cannot be"
  echo "== fetched from this machine: advisories were NOT checked. bans were."
fi
