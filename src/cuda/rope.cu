// YaRN rotary embedding of q and k, fused with writing k and v into the paged KV cache.
#include "cuda/rope.h"

#include <cstdint>

#include "cuda/check.h"

namespace ossrl::cuda {
namespace {

constexpr int kThreads = 256;

// One CTA per token. qkv [n, (heads + 2*kv_heads) * head_dim] fp32 in; q_out [n, heads,
// head_dim] fp32 and cache rows [slot, kv_heads, head_dim] bf16 out. A thread handles one pair
// (j, j + half) of one head: q and k heads are rotated, v heads copied.
__global__ void __launch_bounds__(kThreads)
    rope_qkv_kernel(float* q_out, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const float* qkv,
                    const int32_t* positions, const int32_t* kv_slots, const float* inv_freq,
                    float attention_scaling, int heads, int kv_heads, int head_dim) {
  extern __shared__ float cos_sin[];  // [2, half]: every head of the token shares them
  const int half = head_dim / 2;
  const int64_t t = blockIdx.x;
  const float position = float(positions[t]);
  for (int j = threadIdx.x; j < half; j += kThreads) {
    // The angle rounded to fp32 first, as transformers (and the CPU reference) compute it;
    // sincosf, not __sinf/__cosf: positions reach 1e5 radians and the fast versions lose
    // every digit there.
    float s, c;
    sincosf(position * inv_freq[j], &s, &c);
    cos_sin[j] = c * attention_scaling;
    cos_sin[half + j] = s * attention_scaling;
  }
  __syncthreads();

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

}  // namespace

void rope_qkv_forward(float* q_out, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const float* qkv,
                      const int32_t* positions, const int32_t* kv_slots, const float* inv_freq,
                      float attention_scaling, int n, int heads, int kv_heads, int head_dim,
                      cudaStream_t stream) {
  if (n == 0) return;
  rope_qkv_kernel<<<n, kThreads, head_dim * sizeof(float), stream>>>(q_out, k_cache, v_cache, qkv, positions,
                                                                     kv_slots, inv_freq, attention_scaling, heads,
                                                                     kv_heads, head_dim);
  OSSRL_CUDA_CHECK_LAUNCH();
}

}  // namespace ossrl::cuda
