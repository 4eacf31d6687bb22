#!/usr/bin/env bash
# The test command: set-up, build, then every test. GPU tests skip where no GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j "$(nproc)"
