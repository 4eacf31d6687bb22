// gpt-oss mixture of experts: top-k router, clamped SwiGLU experts, weighted sum; forward
// and backward, with optional LoRA on the experts and a trained router (model/cpu/lora.h).
#pragma once

#include <cstdint>
#include <vector>

#include "model/cpu/activations.h"
#include "model/cpu/lora.h"
#include "model/weights.h"

namespace ossrl {

struct MoeDims {
  int hidden = 0;
  int intermediate = 0;  // per expert
  int experts = 0;
  int experts_per_token = 0;
  float swiglu_limit = 7.0f;
  // Bf16: moe_forward rounds the SwiGLU output (down's input) to bf16 (model/cpu/activations.h).
  Activations activations = Activations::Fp32;
};

// router_logits [n, experts] = x [n, hidden] · routerᵀ + bias. Per token, the k largest
// logits (ties: lowest expert index first, as torch.topk with deterministic algorithms)
// become expert_index [n, k] in descending order, and expert_weight [n, k] = softmax over
// those k logits only (top-k first, softmax second; the other experts get weight 0).
// router_weight / router_bias (fp32 [experts, hidden] / [experts]), when not null, replace
// the checkpoint's (a trained router).
void router_forward(float* router_logits, int32_t* expert_index, float* expert_weight,
                    const float* x, int64_t n, const MoeWeights& w, const MoeDims& dims,
                    const float* router_weight = nullptr, const float* router_bias = nullptr);

// Backward of the softmax over the chosen k: given dexpert_weight [n, k],
//   dlogits[t, index[t,i]] = w_i (dw_i - Σ_j w_j dw_j), 0 for experts not chosen;
// dlogits [n, experts] is overwritten. The choice itself is not differentiated.
void router_softmax_backward(float* dlogits, const float* dexpert_weight, const int32_t* expert_index,
                             const float* expert_weight, int64_t n, const MoeDims& dims);

// h [n, intermediate] from gate_up [n, 2*intermediate], gate and up interleaved
// (gate = gate_up[0::2], up = gate_up[1::2]):
//   gate = min(gate, limit); up = clamp(up, -limit, limit)
//   h = (up + 1) * gate * sigmoid(1.702 * gate)
void swiglu_forward(float* h, const float* gate_up, int64_t n, int intermediate, float limit);

// dgate_up [n, 2*intermediate] += backward of swiglu_forward given dh [n, intermediate].
// A clamped input gets no gradient, with torch.clamp's convention at the bound: gate
// passes where gate <= limit, up where -limit <= up <= limit (equality passes).
void swiglu_backward(float* dgate_up, const float* dh, const float* gate_up, int64_t n, int intermediate,
                     float limit);

// What moe_backward needs from moe_forward. Rows of gate_up / expert_out are (token t,
// slot s) at t*k + s.
struct MoeActivations {
  std::vector<float> router_logits;   // [n, experts]
  std::vector<int32_t> expert_index;  // [n, k]
  std::vector<float> expert_weight;   // [n, k]
  std::vector<float> gate_up;         // [n*k, 2*intermediate] (kept only when asked)
  std::vector<float> expert_out;      // [n*k, hidden] before weighting (kept only when asked)
};

// out [n, hidden] = Σ_k expert_weight[t,k] · expert_{expert_index[t,k]}(x[t]), where
// expert_e(x) = swiglu(x · gate_up[e]ᵀ + gate_up_bias[e]) · down[e]ᵀ + down_bias[e]
// (+ each matrix's LoRA update when `adapters` has one; the router from `adapters` when it
// is trained). Tokens are grouped per expert so each expert's weights are decoded once per
// call; experts are added in ascending index order, as transformers does. act receives the
// routing always, and gate_up / expert_out when keep is set.
void moe_forward(float* out, MoeActivations* act, const float* x, int64_t n, const MoeWeights& w,
                 const MoeDims& dims, const LayerAdapters* adapters, bool keep);

// Backward of moe_forward (with keep): dx [n, hidden] += dL/dx given dout [n, hidden] and
// the forward's x. Through the frozen experts (any format) and their LoRA updates, and
// through the k softmax weights into the router logits, hence x; accumulates the grads of
// the expert adapters and of a trained router.
void moe_backward(float* dx, const float* dout, const float* x, int64_t n, const MoeWeights& w,
                  const MoeDims& dims, const LayerAdapters* adapters, const MoeActivations& act);

}  // namespace ossrl
