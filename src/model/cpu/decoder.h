// One gpt-oss decoder layer on the CPU, as the two residual blocks
//   x += attention(rmsnorm(x));  x += moe(rmsnorm(x)),
// forward and backward. CpuModel (inference, KV caches, no adapters) and train::Policy
// (whole sequences, LoRA, saved activations) both run their layer loop over these, so the
// model's math exists once.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "model/config.h"
#include "model/kv_cache.h"
#include "model/rope.h"
#include "model/weights.h"
#include "model/cpu/activations.h"
#include "model/cpu/lora.h"
#include "model/cpu/moe.h"

namespace ossrl {

// The frozen model a layer reads: config, checkpoint views, RoPE table, and where the
// forward rounds activations (Bf16: inference only, no saved activations).
struct ModelRef {
  const GptOssConfig& config;
  const GptOssWeights& weights;
  const RopeFrequencies& rope;
  Activations activations = Activations::Fp32;
};

// What attention_block_backward needs, filled by attention_block_forward when asked.
// Sizes: n tokens, q_dim = heads*head_dim, kv_dim = kv_heads*head_dim.
struct AttentionActivations {
  std::vector<float> x;          // [n, hidden] block input (residual stream)
  std::vector<float> rstd;       // [n] input_layernorm's 1/rms
  std::vector<float> xn;         // [n, hidden] normed input (q/k/v projections' input)
  std::vector<float> q, k, v;    // [n, q_dim], [n, kv_dim], [n, kv_dim]; q and k after RoPE
  std::vector<float> heads_out;  // [n, q_dim] attention output (o_proj's input)
  std::vector<float> lse;        // [n, heads] log-sum-exp of each softmax, sink included
};

// What moe_block_backward needs.
struct MoeBlockActivations {
  std::vector<float> x;     // [n, hidden] block input
  std::vector<float> rstd;  // [n] post_attention_layernorm's 1/rms
  std::vector<float> xn;    // [n, hidden] the experts' and router's input
  MoeActivations moe;       // routing, gate_up and expert outputs
};

// Everything one forward keeps for backward: per layer both blocks' activations (or, with
// recompute, only each block's input x), and the final norm's input and rstd.
struct DecoderActivations {
  bool recompute = false;
  std::vector<AttentionActivations> attention;  // [layers]
  std::vector<MoeBlockActivations> moe;         // [layers]
  std::vector<float> final_x;                   // [n, hidden]
  std::vector<float> final_rstd;                // [n]
};

// x [n, hidden] += attention(rmsnorm(x)) for layer l of a ragged batch (offsets [B+1]).
// caches: one per sequence (positions continue from caches[b]->length(); the new keys are
// appended, the caller commits), or empty: each sequence is whole, at positions from 0,
// and attends only to itself (training). adapters may be null. saved (may be null) keeps
// what backward needs.
void attention_block_forward(float* x, const ModelRef& m, int l, std::span<const int32_t> offsets,
                             std::span<KvCache* const> caches, const LayerAdapters* adapters,
                             AttentionActivations* saved);

// Backward of attention_block_forward with empty caches: dx [n, hidden] is dLoss/d(block
// output) on entry and dLoss/d(block input) on return (the residual passes it through).
// Accumulates the grads of the adapters' trained parts.
void attention_block_backward(float* dx, const ModelRef& m, int l, std::span<const int32_t> offsets,
                              const LayerAdapters* adapters, const AttentionActivations& saved);

// x [n, hidden] += moe(rmsnorm(x)) for layer l. saved (may be null) keeps what backward needs.
void moe_block_forward(float* x, const ModelRef& m, int l, int64_t n, const LayerAdapters* adapters,
                       MoeBlockActivations* saved);

// Backward of moe_block_forward, in place on dx like attention_block_backward. The choice
// of experts is not differentiated; the gradient reaches the router through the k
// softmax weights.
void moe_block_backward(float* dx, const ModelRef& m, int l, int64_t n, const LayerAdapters* adapters,
                        const MoeBlockActivations& saved);

// The whole stack: returns hidden [n, hidden] = norm(layers(embed(tokens))) for a ragged
// batch, with caches as in attention_block_forward (committed here when given).
// adapters: one entry per layer (null: none) or empty. saved (may be null; needs empty
// caches) keeps what decoder_backward needs; with recompute only each block's input.
std::vector<float> decoder_forward(const ModelRef& m, std::span<const int32_t> tokens,
                                   std::span<const int32_t> offsets, std::span<KvCache* const> caches,
                                   std::span<const LayerAdapters* const> adapters,
                                   DecoderActivations* saved, bool recompute = false);

// Backward of decoder_forward given dhidden [n, hidden] = dLoss/d(final hidden).
// Accumulates the grads of the adapters' trained parts; the gradient reaching
// the embedding is dropped (the embedding is frozen). saved's activations are released
// layer by layer.
void decoder_backward(const float* dhidden, const ModelRef& m, std::span<const int32_t> offsets,
                      std::span<const LayerAdapters* const> adapters, DecoderActivations& saved);

}  // namespace ossrl
