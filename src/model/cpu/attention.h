// Causal grouped-query attention with per-head sinks and an optional sliding window.
#pragma once

#include <cstdint>

#include "model/cpu/activations.h"

namespace ossrl {

struct AttentionDims {
  int64_t n_queries = 0;
  int64_t first_query_position = 0;  // query t sits at position first_query_position + t
  int64_t n_keys = 0;
  int64_t first_key_position = 0;    // key j sits at position first_key_position + j
  int heads = 0;
  int kv_heads = 0;                  // query head h reads kv head h / (heads / kv_heads)
  int head_dim = 0;
  int sliding_window = 0;            // 0: full causal; else keys with p - window < u <= p
  // Bf16: forward computes as the CUDA kernel (model/cpu/activations.h): s_u from q scaled by
  // log2(e)/sqrt(head_dim) held as a bf16 pair hi + lo, in log2 units; each exp2(s_u - max)
  // rounded to bf16 and normalised by the sum of the rounded values.
  Activations activations = Activations::Fp32;
};

// For each query t (position p) and head h, over the allowed keys u (u <= p, and
// p - u < sliding_window when set; counted in positions, not rows):
//   s_u = q[t,h] · k[u,g] / sqrt(head_dim)
//   lse[t,h] = log(exp(sinks[h]) + Σ_u exp(s_u))            (the sink is one more logit)
//   out[t,h] = Σ_u exp(s_u - lse[t,h]) · v[u,g]               (its probability is dropped)
// so the weights on real keys sum to sigmoid(logsumexp(s) - sink) < 1.
// out [n_queries, heads, head_dim]; lse [n_queries, heads] or null (backward needs it);
// q [n_queries, heads, head_dim]; k, v [n_keys, kv_heads, head_dim]; sinks [heads].
// The keys must cover every allowed position of every query. All fp32; the softmax is
// shifted by its max (sink included) so no exp overflows.
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const float* sinks, const AttentionDims& dims);

// Backward of attention_forward, given its inputs, out and lse. With P_u = exp(s_u - lse)
// recomputed per query and D = dout[t,h] · out[t,h] (= Σ_u P_u dout·v_u; the sink carries
// no value):
//   dS_u = P_u (dout · v_u - D);  dq += dS_u k_u / sqrt(d);  dk_u += dS_u q / sqrt(d);
//   dv_u += P_u dout;  dsinks[h] += -exp(sinks[h] - lse) · D
// (the sink logit sits in the normaliser only). All accumulate (+=): dq like q, dk and dv
// like k and v, dsinks [heads] (may be null). Same window, causality and GQA as forward.
void attention_backward(float* dq, float* dk, float* dv, float* dsinks, const float* dout,
                        const float* q, const float* k, const float* v, const float* sinks,
                        const float* out, const float* lse, const AttentionDims& dims);

}  // namespace ossrl
