#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test of the workspace
# (protocol unit and property tests, element tests, multi-process pipeline tests).
# Extra arguments go to `cargo test`, e.g. scripts/test.sh -- --nocapture
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh
# Tests that run gst-launch-1.0 load the plugin from target/debug, which
# `cargo test` alone does not refresh: build it first. With the `ucx` feature, so that
# ucxsink/ucxsrc and tests/ucx.rs are in (docs/ucx.md says why it is not a default feature).
cargo build --workspace --features gst-plugin-bufshare/ucx
exec cargo test --workspace --features gst-plugin-bufshare/ucx "$@"
