// Sink-aware causal attention over whole sequences, for training: the forward keeps each
// row's log-sum-exp, and the backward recomputes the probabilities from it, flash-style, so
// memory stays O(tokens) (never O(tokens x keys)) for full and sliding windows alike. The
// rollout engine's decode/prefill over the paged cache is cuda/attention.h; the math is the
// same (model/cpu/attention.h, the oracle of both).
//
// Layout: a ragged batch of n_seqs whole sequences, sequence b = rows [seq_offsets[b],
// seq_offsets[b+1]) at positions 0, 1, ... (no padding, no cache). seq_offsets [n_seqs + 1]
// int32 on the device; max_seq_len bounds seq_offsets[b+1] - seq_offsets[b] (sizes the grid).
// GQA: query head h reads kv head h / (heads / kv_heads). head_dim 64.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

struct FlashAttentionShape {
  const int32_t* seq_offsets = nullptr;  // [n_seqs + 1] device
  int n_seqs = 0;
  int n_tokens = 0;  // seq_offsets[n_seqs]
  int max_seq_len = 0;
  int heads = 0;
  int kv_heads = 0;
  int head_dim = 64;
  int sliding_window = 0;  // 0: full causal; else keys u with p - window < u <= p
};

// For each token (position p) and head h, over its sequence's keys u allowed by the window:
//   s_u = q · k_u / sqrt(head_dim);  lse = log(exp(sinks[h]) + Σ_u exp(s_u));
//   out = Σ_u exp(s_u - lse) v_u.
// q [n, heads, head_dim] fp32 (after RoPE); k, v [n, kv_heads, head_dim] bf16 (k after RoPE);
// sinks [heads] fp32. out [n, heads, head_dim] bf16; lse [n, heads] fp32.
void flash_attention_forward(__nv_bfloat16* out, float* lse, const float* q, const __nv_bfloat16* k,
                             const __nv_bfloat16* v, const float* sinks, const FlashAttentionShape& shape,
                             cudaStream_t stream);

// Backward of flash_attention_forward given dout [n, heads, head_dim] fp32 and the forward's
// inputs, out and lse. With P_u = exp(s_u - lse) and D = dout · out:
//   dS_u = P_u (dout · v_u - D);  dq = Σ_u dS_u k_u / sqrt(d);  dk_u = Σ dS_u q / sqrt(d);
//   dv_u = Σ P_u dout;  dsinks[h] += -Σ_tokens exp(sinks[h] - lse) · D.
// dq [n, heads, head_dim], dk and dv [n, kv_heads, head_dim] fp32 are overwritten; dsinks
// [heads] fp32 is accumulated (+=), null to skip. scratch [n, heads] fp32 (holds D).
void flash_attention_backward(float* dq, float* dk, float* dv, float* dsinks, float* scratch, const float* dout,
                              const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* sinks,
                              const __nv_bfloat16* out, const float* lse, const FlashAttentionShape& shape,
                              cudaStream_t stream);

}  // namespace ossrl::cuda
