// gpt-oss mixture of experts: top-k router, clamped SwiGLU experts, weighted sum.
#pragma once

#include <cstdint>

#include "model/weights.h"

namespace ossrl {

struct MoeDims {
  int hidden = 0;
  int intermediate = 0;  // per expert
  int experts = 0;
  int experts_per_token = 0;
  float swiglu_limit = 7.0f;
};

// router_logits [n, experts] = x [n, hidden] · routerᵀ + bias. Per token, the k largest
// logits (ties: lowest expert index first, as torch.topk with deterministic algorithms)
// become expert_index [n, k] in descending order, and expert_weight [n, k] = softmax over
// those k logits only (top-k first, softmax second; the other experts get weight 0).
void router_forward(float* router_logits, int32_t* expert_index, float* expert_weight,
                    const float* x, int64_t n, const MoeWeights& w, const MoeDims& dims);

// h [n, intermediate] from gate_up [n, 2*intermediate], gate and up interleaved
// (gate = gate_up[0::2], up = gate_up[1::2]):
//   gate = min(gate, limit); up = clamp(up, -limit, limit)
//   h = (up + 1) * gate * sigmoid(1.702 * gate)
void swiglu_forward(float* h, const float* gate_up, int64_t n, int intermediate, float limit);

// out [n, hidden] = Σ_k expert_weight[t,k] · expert_{expert_index[t,k]}(x[t]), where
// expert_e(x) = swiglu(x · gate_up[e]ᵀ + gate_up_bias[e]) · down[e]ᵀ + down_bias[e].
// Tokens are grouped per expert so each expert's weights are decoded once per call; experts
// are added in ascending index order, as transformers does. router_logits [n, experts],
// expert_index / expert_weight [n, k] are outputs the backward pass reuses.
void moe_forward(float* out, float* router_logits, int32_t* expert_index, float* expert_weight,
                 const float* x, int64_t n, const MoeWeights& w, const MoeDims& dims);

}  // namespace ossrl
