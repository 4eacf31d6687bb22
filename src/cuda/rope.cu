// YaRN rotary embedding of q and k, fused with writing k and v into the paged KV cache.
#include "cuda/rope.h"

#include <cstdint>

#include "cuda/check.h"
#include "cuda/launch.cuh"

namespace ossrl::cuda {
namespace {

constexpr int kThreads = 256;

// cos_sin [2, head_dim/2] in shared memory: cos and sin(position * inv_freq[j]) *
// attention_scaling for one token, which every head of the token shares. Ends in __syncthreads.
__device__ void rope_cos_sin(float* cos_sin, int32_t position, const float* inv_freq, float attention_scaling,
                             int half) {
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    // The angle rounded to fp32 first, as transformers (and the CPU reference) compute it;
    // sincosf, not __sinf/__cosf: positions reach 1e5 radians and the fast versions lose
    // every digit there.
    float s, c;
    sincosf(float(position) * inv_freq[j], &s, &c);
    cos_sin[j] = c * attention_scaling;
    cos_sin[half + j] = s * attention_scaling;
  }
  __syncthreads();
}

// One CTA per token. qkv [n, (heads + 2*kv_heads) * head_dim] fp32 in; q_out [n, heads,
// head_dim] fp32 and cache rows [slot, kv_heads, head_dim] bf16 out. A thread handles one pair
// (j, j + half) of one head: q and k heads are rotated, v heads copied. A programmatic
// dependent (cuda/launch.cuh), released after its wait.
__global__ void __launch_bounds__(kThreads)
    rope_qkv_kernel(float* q_out, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const float* qkv,
                    const int32_t* positions, const int32_t* kv_slots, const float* inv_freq,
                    float attention_scaling, int heads, int kv_heads, int head_dim) {
  extern __shared__ float cos_sin[];  // [2, half]: every head of the token shares them
  const int half = head_dim / 2;
  const int64_t t = blockIdx.x;
  wait_for_producers();
  release_dependents();
  rope_cos_sin(cos_sin, positions[t], inv_freq, attention_scaling, half);

  const int64_t slot = kv_slots[t];
  const float* row = qkv + t * int64_t(heads + 2 * kv_heads) * head_dim;
  for (int pair = threadIdx.x; pair < (heads + 2 * kv_heads) * half; pair += kThreads) {
    const int h = pair / half;
    const int j = pair % half;
    const float a = row[h * head_dim + j];
    const float b = row[h * head_dim + j + half];
    const float c = cos_sin[j];
    const float s = cos_sin[half + j];
    const float rotated_a = a * c - b * s;
    const float rotated_b = b * c + a * s;
    if (h < heads) {
      float* q = q_out + (t * heads + h) * head_dim;
      q[j] = rotated_a;
      q[j + half] = rotated_b;
    } else if (slot >= 0) {  // a padding token writes no cache row
      const bool is_k = h < heads + kv_heads;
      const int kv = is_k ? h - heads : h - heads - kv_heads;
      __nv_bfloat16* dst = (is_k ? k_cache : v_cache) + (slot * kv_heads + kv) * head_dim;
      dst[j] = __float2bfloat16_rn(is_k ? rotated_a : a);
      dst[j + half] = __float2bfloat16_rn(is_k ? rotated_b : b);
    }
  }
}

// Backward, one CTA per token: dqkv [n, (heads + 2*kv_heads) * head_dim] fp32 out; dq [n,
// heads, head_dim], dk and dv [n, kv_heads, head_dim] fp32 in. A thread handles one pair (j, j +
// half) of one head: q and k gradients are rotated by -angle, v gradients copied. The rotation is
// model/cpu/rope.cpp's with sin negated, in its rounding (no fused multiply-add), so the two
// differ only by sincosf against glibc.
__global__ void __launch_bounds__(kThreads)
    rope_qkv_backward_kernel(float* dqkv, const float* dq, const float* dk, const float* dv, const int32_t* positions,
                             const float* inv_freq, float attention_scaling, int heads, int kv_heads, int head_dim) {
  extern __shared__ float cos_sin[];  // [2, half]
  const int half = head_dim / 2;
  const int64_t t = blockIdx.x;
  rope_cos_sin(cos_sin, positions[t], inv_freq, attention_scaling, half);

  float* row = dqkv + t * int64_t(heads + 2 * kv_heads) * head_dim;
  for (int pair = threadIdx.x; pair < (heads + 2 * kv_heads) * half; pair += kThreads) {
    const int h = pair / half;
    const int j = pair % half;
    const float* src = h < heads              ? dq + (t * heads + h) * head_dim
                       : h < heads + kv_heads ? dk + (t * kv_heads + h - heads) * head_dim
                                              : dv + (t * kv_heads + h - heads - kv_heads) * head_dim;
    const float a = src[j];
    const float b = src[j + half];
    float* dst = row + h * head_dim;
    if (h < heads + kv_heads) {
      const float c = cos_sin[j];
      const float s = -cos_sin[half + j];
      dst[j] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
      dst[j + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    } else {
      dst[j] = a;
      dst[j + half] = b;
    }
  }
}

}  // namespace

void rope_qkv_forward(float* q_out, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const float* qkv,
                      const int32_t* positions, const int32_t* kv_slots, const float* inv_freq,
                      float attention_scaling, int n, int heads, int kv_heads, int head_dim,
                      cudaStream_t stream) {
  if (n == 0) return;
  const LaunchShape shape{.grid = dim3(n),
                          .block = kThreads,
                          .shared_bytes = head_dim * sizeof(float)};
  launch_kernel(rope_qkv_kernel, shape, stream, q_out, k_cache, v_cache, qkv, positions, kv_slots, inv_freq,
                attention_scaling, heads, kv_heads, head_dim);
}

void rope_qkv_backward(float* dqkv, const float* dq, const float* dk, const float* dv, const int32_t* positions,
                       const float* inv_freq, float attention_scaling, int n, int heads, int kv_heads, int head_dim,
                       cudaStream_t stream) {
  if (n == 0) return;
  rope_qkv_backward_kernel<<<n, kThreads, head_dim * sizeof(float), stream>>>(
      dqkv, dq, dk, dv, positions, inv_freq, attention_scaling, heads, kv_heads, head_dim);
  OSSRL_CUDA_CHECK_LAUNCH();
}

}  // namespace ossrl::cuda
