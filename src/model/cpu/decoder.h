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
#include "model/cpu/lora.h"

namespace ossrl {

// The frozen model a layer reads: config, checkpoint views, RoPE table.
struct ModelRef {
  const GptOssConfig& config;
  const GptOssWeights& weights;
  const RopeFrequencies& rope;
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

// What moe_block_backward needs. Rows of gate_up / expert_out are (token t, slot s) at
// t*k + s, k = experts_per_token.
struct MoeActivations {
  std::vector<float> x;              // [n, hidden] block input
  std::vector<float> rstd;           // [n]
  std::vector<float> xn;             // [n, hidden]
  std::vector<float> router_logits;  // [n, experts]
  std::vector<int32_t> expert_index; // [n, k] chosen experts, descending logit
  std::vector<float> expert_weight;  // [n, k] softmax over the chosen logits
  std::vector<float> gate_up;        // [n*k, 2*intermediate] before the clamped SwiGLU
  std::vector<float> expert_out;     // [n*k, hidden] each expert's output before weighting
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
                       MoeActivations* saved);

// Backward of moe_block_forward, in place on dx like attention_block_backward. The choice
// of experts is not differentiated; the gradient reaches the router through the k
// softmax weights.
void moe_block_backward(float* dx, const ModelRef& m, int l, int64_t n, const LayerAdapters* adapters,
                        const MoeActivations& saved);

}  // namespace ossrl
