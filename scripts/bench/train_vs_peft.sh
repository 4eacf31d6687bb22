#!/usr/bin/env bash
# Both sides of the training benchmark, one after the other on the same GPU in one run:
# `ossrl bench train` (random weights of the gpt-oss shape, MXFP4 experts, LoRA on attention
# and experts) and transformers + PEFT (hf_train.py: the same shape in bf16, the same batch,
# sequence length and LoRA rank; LoRA on attention + experts and on attention only, the
# configuration the issue's reference was taken with), then one table with the multiple
# ossrl tokens/s / transformers tokens/s. Arguments go to `ossrl bench train` as well.
#
#   bash scripts/bench/train_vs_peft.sh                          # 20b, 4 x 1024, r 16
#   MODEL=120b HF=0 bash scripts/bench/train_vs_peft.sh --steps 5
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ossrl=${OSSRL:-$here/../../build/ossrl}
model=${MODEL:-20b}
batch=${BATCH:-4}
seq_len=${SEQ_LEN:-1024}
rank=${LORA_R:-16}
hf_targets=${HF_TARGETS:-attention+experts,attention}
out=${OUT_DIR:-bench-out}
mkdir -p "$out"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
date -u +%Y-%m-%dT%H:%MZ
"$ossrl" bench train --model "$model" --experts mxfp4 --batch "$batch" --seq-len "$seq_len" --lora-r "$rank" \
  --targets attention,experts --json "$out/ossrl-train-$model.json" "$@"
[ "${HF:-1}" = 1 ] || exit 0
python3 "$here/hf_train.py" --model "$model" --batch "$batch" --seq-len "$seq_len" --lora-r "$rank" \
  --targets "$hf_targets" ${HF_EXPERTS:+--experts-impl "$HF_EXPERTS"} --json "$out/transformers-train-$model.json"

python3 - "$out/ossrl-train-$model.json" "$out/transformers-train-$model.json" "$batch" "$seq_len" <<'PY'
import json, sys
GiB = 1 << 30
ours = json.load(open(sys.argv[1]))
ours = ours[0] if isinstance(ours, list) else ours
peer = json.load(open(sys.argv[2]))
batch, seq_len = sys.argv[3], sys.argv[4]
# ossrl's row names the device memory in use as bench generate's rows do (peak_gpu_bytes).
ours_in_use = f"{ours['peak_gpu_bytes'] / GiB:.2f}" if "peak_gpu_bytes" in ours else "-"
print(f"\nbatch {batch} x {seq_len} tokens, LoRA r {ours.get('lora_r', '-')}")
print(f"{'engine':>13} {'LoRA targets':>18} {'tokens/s':>10} {'peak GiB':>9} {'in use GiB':>11} {'ossrl multiple':>15}")
print(f"{'ossrl':>13} {'attention,experts':>18} {ours['tokens_per_second']:>10.0f} {'-':>9} {ours_in_use:>11} {'':>15}")
for p in peer:
    if p.get("out_of_memory"):
        print(f"{'transformers':>13} {p['targets']:>18} {'out of GPU memory':>21} {'-':>11} {'-':>15}")
    else:
        print(f"{'transformers':>13} {p['targets']:>18} {p['tokens_per_s']:>10.0f} {p['peak_gib']:>9.2f} "
              f"{p['gpu_in_use_gib']:>11.2f} {ours['tokens_per_second'] / p['tokens_per_s']:>14.1f}x")
print("\nossrl multiple: ossrl tokens/s / that row's. peak: torch.cuda.max_memory_allocated over the timed steps; "
      "in use: the device's memory in use (all processes), as nvidia-smi counts it.")
PY
