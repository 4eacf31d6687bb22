"""What the transformers peers of the ossrl benchmarks share: a random gpt-oss model of the
released 20b or 120b shape, built in bf16 straight on the GPU (no checkpoint to download)."""

import torch
import transformers
from transformers import GptOssConfig, GptOssForCausalLM

SHAPES = {
    # The released configs' shapes (config.json of openai/gpt-oss-20b and -120b).
    "20b": dict(num_hidden_layers=24, num_local_experts=32),
    "120b": dict(num_hidden_layers=36, num_local_experts=128),
}


def build_model(name: str, attn: str, experts: str | None) -> GptOssForCausalLM:
    layers = SHAPES[name]["num_hidden_layers"]
    config = GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, head_dim=64,
        num_attention_heads=64, num_key_value_heads=8, sliding_window=128,
        num_experts_per_tok=4, max_position_embeddings=131072, rms_norm_eps=1e-5,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        **SHAPES[name])
    config._attn_implementation = attn
    if experts:
        # transformers 5's expert loop: "batched_mm" (its default for generation: gathers one
        # weight copy per (token, expert), 15.8 GiB at batch 256), "grouped_mm" or "eager".
        config._experts_implementation = experts
    # Built in bf16 straight on the GPU: an fp32 copy of 20b alone would take 84 GB.
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)


def describe(model: GptOssForCausalLM, name: str, build_s: float) -> str:
    """Versions, device and model settings: the head of each peer's output."""
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    return (f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}\n"
            f"gpt-oss-{name} shape, random bf16 weights {weights_gb:.1f} GB, "
            f"attn={model.config._attn_implementation}, "
            f"experts={getattr(model.config, '_experts_implementation', None)}, built in {build_s:.0f} s")
