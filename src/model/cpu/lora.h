// LoRA as a CPU op: the low-rank update added to a frozen linear layer,
//   y = x · Wᵀ + b + scale · (dropout(x) · Aᵀ) · Bᵀ,
// with A [r, in] and B [out, r] in fp32 (PEFT's lora_A / lora_B weight shapes). The frozen
// W stays in the checkpoint's encoding; only A and B (and their grads) are fp32.
#pragma once

#include <cstdint>
#include <vector>

namespace ossrl {

// A view of one adapter. The memory belongs to the caller (train/lora.h owns it).
struct LowRankAdapter {
  const float* a = nullptr;  // [r, in]; null: no adapter on this linear
  const float* b = nullptr;  // [out, r]
  float* grad_a = nullptr;   // [r, in], accumulated (+=) by lora_backward; null: not trained
  float* grad_b = nullptr;   // [out, r]
  int r = 0;
  int64_t in = 0;
  int64_t out = 0;
  float scale = 0.0f;  // lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA)
  // Inverted dropout on the adapter's input, as PEFT's lora_dropout: each input value is
  // zeroed with probability `dropout`, the rest scaled by 1/(1 - dropout). The mask is a
  // hash of (dropout_key, row id, feature), so backward (and a recomputed forward)
  // regenerates exactly the mask forward used without storing it.
  float dropout = 0.0f;
  uint64_t dropout_key = 0;

  bool active() const { return a != nullptr; }
};

// y [n, out] += scale · (dropout(x) [n, in] · Aᵀ) · Bᵀ. row_ids [n] names each row for the
// dropout mask (the token's index in the batch, so the mask does not depend on how rows
// were gathered); null means rows 0..n-1. No-op when !ad.active().
void lora_forward(float* y, const float* x, const int64_t* row_ids, int64_t n, const LowRankAdapter& ad);

// Given dy [n, out] and the forward input x [n, in]:
//   dx [n, in] += scale · dropout_mask ⊙ ((dy · B) · A)       (dx may be null)
//   grad_a [r, in] += scale · (dy · B)ᵀ · dropout(x)            (when grad_a is set)
//   grad_b [out, r] += scale · dyᵀ · (dropout(x) · Aᵀ)           (when grad_b is set)
// The frozen W's own dx is linear_backward_input's job.
void lora_backward(float* dx, const float* dy, const float* x, const int64_t* row_ids, int64_t n,
                   const LowRankAdapter& ad);

// Everything trainable in one decoder layer, as views; what is null or empty falls back to
// the checkpoint. train/lora.h builds these; CpuModel passes none.
struct LayerAdapters {
  LowRankAdapter q_proj, k_proj, v_proj, o_proj;
  // Per expert ([experts] each) or empty. gate_up's B rows are the checkpoint's logical
  // output rows: gate and up interleaved (gate = even rows, up = odd rows).
  std::vector<LowRankAdapter> gate_up_proj, down_proj;
  // Trained replacements of the checkpoint's sinks [heads] and router weight [experts,
  // hidden] / bias [experts], with their grads (accumulated; null: not trained).
  const float* sinks = nullptr;
  float* grad_sinks = nullptr;
  const float* router_weight = nullptr;
  const float* router_bias = nullptr;
  float* grad_router_weight = nullptr;
  float* grad_router_bias = nullptr;
};

// The dropout multiplier of input (row id, feature): 0 or 1/(1 - p). Exposed for tests.
float lora_dropout_multiplier(uint64_t key, int64_t row_id, int64_t feature, float p);

// A dropout key per (seed, step, layer, module, expert; expert -1 for none): distinct
// masks for every adapter and every step.
uint64_t lora_dropout_key(uint64_t seed, uint64_t step, int layer, int module, int expert);

}  // namespace ossrl
