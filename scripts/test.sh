#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test of the workspace
# (protocol unit and property tests, element tests, multi-process pipeline tests).
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo test --workspace "$@"
