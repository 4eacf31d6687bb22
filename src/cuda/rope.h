// YaRN rotary embedding of q and k, fused with writing k and v into the paged KV cache.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

// qkv [n, (heads + 2*kv_heads) * head_dim] fp32: q heads, then k heads, then v heads per token
// (the fused projection's output, bias included). Token i sits at positions[i]; with
// cos/sin = cos/sin(float(positions[i]) * inv_freq[j]) * attention_scaling (model/cpu/rope.h's
// half-split rotation, the angle rounded to fp32 first):
//   q_out [n, heads, head_dim] fp32 = rotate(q)
//   k_cache / v_cache [slots, kv_heads, head_dim] bf16, row kv_slots[i] = rotate(k), v.
// A negative kv_slots[i] marks a padding token: its k and v are not written.
void rope_qkv_forward(float* q_out, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const float* qkv,
                      const int32_t* positions, const int32_t* kv_slots, const float* inv_freq,
                      float attention_scaling, int n, int heads, int kv_heads, int head_dim,
                      cudaStream_t stream);

// Backward of rope_qkv_forward's q and k rotations for training: dqkv [n, (heads + 2*kv_heads)
// * head_dim] fp32 (overwritten) = [rotateᵀ(dq) | rotateᵀ(dk) | dv] per token, given dq [n,
// heads, head_dim], dk and dv [n, kv_heads, head_dim] fp32 and the same positions, inv_freq
// and attention_scaling (the transpose of the rotation is the rotation by -angle).
void rope_qkv_backward(float* dqkv, const float* dq, const float* dk, const float* dv, const int32_t* positions,
                       const float* inv_freq, float attention_scaling, int n, int heads, int kv_heads, int head_dim,
                       cudaStream_t stream);

}  // namespace ossrl::cuda
