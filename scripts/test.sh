#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Formatting, lints, then every test of the
# workspace. Integration tests start real brokers on free loopback ports, so they run in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
# Doc tests are not covered by --all-targets.
cargo test --workspace --doc
# The cargo-fuzz target is its own workspace (it needs nightly to *run*); check that it still
# compiles against the codec, on the stable toolchain.
cargo check --quiet --manifest-path protocol/fuzz/Cargo.toml --bins
cargo check --quiet --manifest-path storage/fuzz/Cargo.toml --bins
