#!/usr/bin/env python3
"""The peer for `ossrl bench train`: transformers + PEFT LoRA taking GRPO update steps on a
random gpt-oss model of the same shape on the same GPU.

The base model is bf16 (transformers has no MXFP4 training path; see hf_generate.py), frozen,
with a PEFT LoRA adapter (r=16, alpha=32, dropout 0) on q/k/v/o_proj ("attention") or on those
and the experts' gate_up_proj and down_proj through target_parameters ("attention+experts",
as scripts/fixtures/make_grad_fixtures.py adapts them). Gradient checkpointing is on, non-
reentrant, as TRL sets it. The experts run as transformers picks (5.17: grouped_mm) unless
--experts-impl names one.

One update step, as TRL's GRPOTrainer takes it with one iteration per generation batch, beta 0
and temperature 1: forward over --batch random sequences of --seq-len ids, per-token log-probs of
the next token (TRL's selective_log_softmax: log_softmax and gather, a row at a time in bf16),
the clipped-ratio loss on random per-sequence advantages (old log-probs = the detached current
ones, DAPO normalisation), backward, gradient clipping to norm 1 and an AdamW step on the
adapter. The optimizer's share is small (the adapter is ~8M values with attention only, ~185M
with the experts). s/step is the mean of --steps timed steps after --warmup; tokens/s = batch x
seq len / s/step; peak = torch.cuda.max_memory_allocated over the timed steps; in use = the
device's total minus free memory after them (the allocator's cache, the CUDA context and any
other process included), as nvidia-smi counts it.

    python3 scripts/bench/hf_train.py --model 20b --batch 4 --seq-len 1024 --targets attention,attention+experts

H100 80GB, transformers 5.17.0, torch 2.11.0, peft 0.21.0, that command with --steps 3: attention
0.932 s/step (4,395 tokens/s), peak 44.3 GiB, 48.2 GiB in use; attention+experts 1.204 s/step
(3,402 tokens/s), peak 47.1 GiB, 50.7 GiB in use.
"""

import argparse
import gc
import itertools
import json
import time

import torch
import peft
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from hf_common import SHAPES, build_model, describe

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TARGET_SETS = ("attention", "attention+experts")
CLIP = (0.2, 0.28)  # TRL's epsilon and epsilon_high
GiB = 1 << 30


def lora_config(targets: str, rank: int) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=ATTENTION,
                      target_parameters=EXPERTS if targets == "attention+experts" else None)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's bf16 path: log_softmax then gather, one sequence at a time to bound the peak."""
    return torch.stack([F.log_softmax(row, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                        for row, ids in zip(logits, index)])


def update_step(model, optimizer, params, ids: torch.Tensor, advantages: torch.Tensor) -> None:
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    logps = selective_log_softmax(logits[:, :-1], ids[:, 1:])
    ratio = torch.exp(logps - logps.detach())
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - CLIP[0], 1 + CLIP[1]) * adv)
    loss = per_token.sum() / per_token.numel()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench(model, batch: int, seq_len: int, warmup: int, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    ids = torch.randint(0, 200000, (batch, seq_len), device="cuda")
    advantages = torch.randn(batch, device="cuda")
    for _ in range(warmup):
        update_step(model, optimizer, params, ids, advantages)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        update_step(model, optimizer, params, ids, advantages)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    free, total = torch.cuda.mem_get_info()
    s_per_step = sum(times) / len(times)
    return dict(s_per_step=s_per_step, step_seconds=times, tokens_per_s=batch * seq_len / s_per_step,
                peak_gib=torch.cuda.max_memory_allocated() / GiB, gpu_in_use_gib=(total - free) / GiB)


def print_row(row: dict) -> None:
    ckpt = "on" if row["gradient_checkpointing"] else "off"
    head = f"{row['targets']:>18} {ckpt:>5} {row['batch']:>6} {row['seq_len']:>8}"
    if row.get("out_of_memory"):
        print(f"{head} {'out of GPU memory':>40}", flush=True)
    else:
        print(f"{head} {row['s_per_step']:>8.3f} {row['tokens_per_s']:>10.0f} {row['peak_gib']:>9.2f} "
              f"{row['gpu_in_use_gib']:>9.2f}", flush=True)


def bench_target_sets(model, target_sets: list[str], shapes, args, settings: dict) -> list[dict]:
    """A row for each target set and (batch, seq len), the adapter attached to the one base model in turn."""
    print(f"{'targets':>18} {'ckpt':>5} {'batch':>6} {'seq len':>8} {'s/step':>8} {'tokens/s':>10} "
          f"{'peak GiB':>9} {'in use':>9}")
    rows = []
    for i, targets in enumerate(target_sets):
        peft_model = get_peft_model(model, lora_config(targets, args.lora_r))
        peft_model.train()
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        for batch, seq_len in shapes:
            row = dict(settings, targets=targets, batch=batch, seq_len=seq_len, trainable_params=trainable)
            try:
                row.update(bench(peft_model, batch, seq_len, args.warmup, args.steps))
            except torch.OutOfMemoryError:
                # A result too: the row says so and the next shape still runs.
                row.update(out_of_memory=True, stage="step")
            rows.append(row)
            print_row(row)
            peft_model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        if i + 1 < len(target_sets):
            model = peft_model.unload()  # the bare base model again, for the next target set
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="20b")
    parser.add_argument("--batch", default="4", help="comma-separated batch sizes (sequences per step)")
    parser.add_argument("--seq-len", default="1024", help="comma-separated sequence lengths (tokens)")
    parser.add_argument("--targets", default="attention,attention+experts",
                        help=f"comma-separated LoRA target sets, each one of {', '.join(TARGET_SETS)}")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false",
                        help="keep every layer's activations instead of recomputing them in backward")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--attn", default="eager", help="transformers attn_implementation")
    parser.add_argument("--experts-impl", help="transformers experts implementation (default: its own)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    target_sets = args.targets.split(",")
    for t in target_sets:
        if t not in TARGET_SETS:
            parser.error(f"--targets: {t!r} is none of {', '.join(TARGET_SETS)}")
    shapes = list(itertools.product([int(b) for b in args.batch.split(",")],
                                    [int(s) for s in args.seq_len.split(",")]))

    settings = dict(engine="transformers", model=args.model, lora_r=args.lora_r,
                    gradient_checkpointing=args.checkpointing, attn=args.attn, experts_impl=args.experts_impl,
                    warmup=args.warmup, steps=args.steps)
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model = build_model(args.model, args.attn, args.experts_impl)
    except torch.OutOfMemoryError:
        # The bf16 weights alone do not fit (120b: 234 GB): every row is out of memory.
        print(f"gpt-oss-{args.model}: the bf16 weights do not fit in GPU memory")
        rows = [dict(settings, targets=t, batch=b, seq_len=s, out_of_memory=True, stage="weights")
                for t in target_sets for b, s in shapes]
    else:
        print(describe(model, args.model, time.perf_counter() - start))
        settings["experts_impl"] = getattr(model.config, "_experts_implementation", None)
        if args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        print(f"peft {peft.__version__}, LoRA r={args.lora_r} alpha={2 * args.lora_r}; one step: forward, "
              f"per-token log-probs, GRPO loss, backward, AdamW; {args.warmup} warm-up + {args.steps} timed steps")
        rows = bench_target_sets(model, target_sets, shapes, args, settings)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
