#!/usr/bin/env bash
# Both sides of the generation benchmark, one after the other on the same GPU in one run:
# `ossrl bench generate` (random weights of the gpt-oss shape, MXFP4 experts) and
# transformers (hf_generate.py: the same shape in bf16, the same prompt length), then one
# table with the multiple. transformers generates fewer new tokens (HF_NEW_TOKENS, default
# 64) so its slow batch-256 row fits in the run; its per-token time only grows with the
# context, so the shorter run flatters it, never us.
#
#   bash scripts/bench/generate_vs_transformers.sh            # 20b, batches 1,64,256
#   MODEL=120b BATCHES=1,64 HF=0 bash scripts/bench/generate_vs_transformers.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ossrl=${OSSRL:-$here/../../build/ossrl}
model=${MODEL:-20b}
batches=${BATCHES:-1,64,256}
prompt=${PROMPT_TOKENS:-256}
new=${NEW_TOKENS:-256}
hf_new=${HF_NEW_TOKENS:-64}
out=${OUT_DIR:-bench-out}
mkdir -p "$out"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
date -u +%Y-%m-%dT%H:%MZ
"$ossrl" bench generate --model "$model" --batch "$batches" --prompt-tokens "$prompt" --new-tokens "$new" \
  --json "$out/ossrl-$model.json"
[ "${HF:-1}" = 1 ] || exit 0
python3 "$here/hf_generate.py" --model "$model" --batch "$batches" --prompt-tokens "$prompt" \
  --new-tokens "$hf_new" ${HF_EXPERTS:+--experts-impl "$HF_EXPERTS"} --json "$out/transformers-$model.json"

python3 - "$out/ossrl-$model.json" "$out/transformers-$model.json" <<'PY'
import json, sys
ours = {r["batch"]: r for r in json.load(open(sys.argv[1]))}
peer = {r["batch"]: r for r in json.load(open(sys.argv[2]))}
print(f"\n{'batch':>6} {'ossrl tok/s':>12} {'roofline %':>11} {'transformers tok/s':>19} {'multiple':>9}")
for b in sorted(ours):
    o, p = ours[b], peer.get(b)
    if p and not p.get("out_of_memory"):
        hf = f"{p['tokens_per_s']:>19.1f} {o['tokens_per_second'] / p['tokens_per_s']:>8.1f}x"
    else:
        hf = f"{'out of memory' if p else '-':>19} {'-':>9}"
    print(f"{b:>6} {o['tokens_per_second']:>12.1f} {o['roofline_percent']:>11.1f} {hf}")
PY
