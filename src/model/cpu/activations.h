// Where the CPU reference rounds its activations. It runs in fp32 (the oracle, and the
// trainer's forward and backward); for inference it can also round to bf16 wherever the CUDA
// engine (engine/cuda_model.cpp and its kernels) does, so that it computes what the GPU
// computes up to fp32 summation order:
//
//   rounded to bf16                                   kept fp32
//   input_layernorm output (q/k/v's input)            the residual stream, embedding rows
//   k after RoPE and v (the KV cache)                 q, k, v out of their matmul; RoPE
//   q · log2(e)/sqrt(head_dim), to a bf16 pair        attention scores (log2 units), softmax
//     hi + lo (~16 bits: the attention's mma input)     max and sum, o_proj's output
//   attention probabilities exp2(s - max) (P of P·V)  router logits, top-k softmax weights
//   attention output (o_proj's input)                 gate_up output and SwiGLU arithmetic
//   post_attention_layernorm output (router and       down output, the weighted expert sum
//     gate_up's input)                                logits
//   SwiGLU output (down's input)
//   final norm output (lm_head's input)
//
// The weights are the checkpoint's bf16 (or MXFP4) values on both sides. Not replayed: the
// kernels' fp32 summation orders (matmul splits, the norms' reduction tree, the expert sum in
// top-k order where this sums by expert index), CUDA's expf, and the attention kernel's
// rounding of P against the running max of each 16- or 32-key chunk its warps and CTAs take
// (rescaled in fp32 when a later chunk raises the max), where this rounds against the row's
// final max, the sink included. An fp32 difference flips a bf16 rounding now and then, which
// moves the result by a bf16 step. LoRA adapters stay fp32 here (the GPU keeps bf16 copies of
// A and B and rounds x·Aᵀ). Forward only: backward needs the fp32 activations.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace ossrl {

enum class Activations { Fp32, Bf16 };

// x[0, n) rounded to bf16 (to nearest even, as __float2bfloat16_rn) in place under Bf16;
// untouched under Fp32.
inline void round_activations(float* x, int64_t n, Activations activations) {
  if (activations == Activations::Fp32) return;
  for (int64_t i = 0; i < n; ++i) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}

}  // namespace ossrl
