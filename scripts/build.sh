#!/usr/bin/env bash
# Configures and builds ossrl into build/ (CUDA kernels too when nvcc is present).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
