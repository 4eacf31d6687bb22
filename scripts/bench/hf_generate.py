#!/usr/bin/env python3
"""The peer for `ossrl bench generate`: Hugging Face transformers generating with a random
gpt-oss model of the same shape on the same GPU.

transformers has no MXFP4 path without the downloaded `kernels` hub packages (none can be
fetched on the GPU machine), so its experts are bf16: it moves 4x more expert bytes per
step than ossrl's MXFP4 experts. That is the configuration users without those kernels get,
and the one the issue's numbers (17.7 / 146 / 234 tokens/s) were taken with.

Each row: random prompts of --prompt-tokens ids, sampling at temperature 1 (top-p 1, no
top-k), exactly --new-tokens new tokens (min_new_tokens = max_new_tokens: no early stop),
wall time of generate() including the prefill, tokens/s = batch * new tokens / wall, and the
peak of torch.cuda.max_memory_allocated.

    python3 scripts/bench/hf_generate.py --model 20b --batch 1,64 --new-tokens 64 --json out.json
"""

import argparse
import json
import time

import torch

from hf_common import SHAPES, build_model, describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="20b")
    parser.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--attn", default="eager", help="transformers attn_implementation")
    parser.add_argument("--experts-impl", help="transformers experts implementation (default: its own)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(args.model, args.attn, args.experts_impl).eval()
    print(describe(model, args.model, time.perf_counter() - start))
    print(f"{'batch':>6} {'prompt':>7} {'new':>5} {'tokens/s':>10} {'ms/token':>9} {'wall s':>8} {'peak GB':>8}")

    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = torch.randint(0, 200000, (batch, args.prompt_tokens), device="cuda")
        mask = torch.ones_like(prompts)
        kwargs = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                      pad_token_id=199999)
        try:
            model.generate(prompts, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = model.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        except torch.OutOfMemoryError:
            # A result too: the row says so and the next batch size still runs.
            rows.append(dict(engine="transformers", model=args.model, batch=batch, out_of_memory=True))
            print(f"{batch:>6} {args.prompt_tokens:>7} {'out of GPU memory':>30}", flush=True)
            torch.cuda.empty_cache()
            continue
        new = out.shape[1] - args.prompt_tokens
        row = dict(engine="transformers", model=args.model, batch=batch, prompt_tokens=args.prompt_tokens,
                   new_tokens=new, tokens_per_s=batch * new / wall, ms_per_token=1000 * wall / new,
                   wall_s=wall, peak_gb=torch.cuda.max_memory_allocated() / 1e9)
        rows.append(row)
        print(f"{batch:>6} {args.prompt_tokens:>7} {new:>5} {row['tokens_per_s']:>10.1f} "
              f"{row['ms_per_token']:>9.1f} {wall:>8.1f} {row['peak_gb']:>8.1f}", flush=True)
        del out
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
