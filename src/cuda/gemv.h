// The dense bf16 matmul for a few rows of x (decode steps): a bandwidth-bound kernel that
// streams W once at close to the memory's speed, where cuBLAS's GEMM tiles (made for many
// rows) reach about half of it. cuda/linear.h's linear_forward picks it by itself; call it
// directly only to compare kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

// The most rows of x the skinny kernel takes: two 8-token tiles of an mma. Up to 16 rows it
// beat cuBLAS at every gpt-oss-20b shape on an H100 (linear_bench: qkv, o_proj and the router
// by 1.3 to 1.7 times, lm_head by 2%); a four-tile variant ran at 0.35 to 0.6 times
// cuBLAS's speed at 32 rows.
constexpr int kSkinnyMaxRows = 16;

// Whether skinny_linear_forward takes these operands: 1 ≤ n ≤ kSkinnyMaxRows, `in` a multiple
// of 8 and x, w 16-byte aligned (every row is read in 16-byte pieces).
bool skinny_linear_fits(const __nv_bfloat16* x, const __nv_bfloat16* w, int n, int in);

// y [n, out] fp32 = (accumulate ? y : 0) + x [n, in] bf16 · Wᵀ + bias, W bf16 [out, in],
// bias [out] fp32 or null; fp32 accumulation (linear_forward's contract). Needs
// skinny_linear_fits. Launches one kernel on `stream`, allocates nothing: graph-capturable.
void skinny_linear_forward(float* y, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* bias, int n,
                           int in, int out, bool accumulate, cudaStream_t stream);

// The attention block's input for a decode-sized step in one launch, where three launches
// (rmsnorm_forward, the qkv linear_forward, rope_qkv_forward) cost more in launch gaps than in
// work: each CTA norms the n residual rows into shared memory (rounded to bf16 as
// rmsnorm_forward rounds them; the sum of squares in another fp32 order), the skinny kernel
// multiplies them by the fused q|k|v weight (+ bias), and the epilogue rotates q and k and
// writes q_out and the cache rows as rope_qkv_forward does (the qkv rows are tiled so that a
// rotation pair (j, j + head_dim/2) lands in one lane). Shapes and dtypes as those three ops:
//   residual [n, hidden] fp32, norm_weight [hidden] fp32, w [(heads + 2 kv_heads) head_dim,
//   hidden] bf16, bias [(heads + 2 kv_heads) head_dim] fp32 or null; q_out [n, heads,
//   head_dim] fp32, k_cache / v_cache [slots, kv_heads, head_dim] bf16 rows kv_slots[i] (none
//   for a negative slot), positions / kv_slots [n], inv_freq [head_dim / 2].
struct QkvRopeOperands {
  float* q_out;
  __nv_bfloat16* k_cache;
  __nv_bfloat16* v_cache;
  const float* residual;
  const float* norm_weight;
  float eps;
  const __nv_bfloat16* w;
  const float* bias;
  const int32_t* positions;
  const int32_t* kv_slots;
  const float* inv_freq;
  float attention_scaling;
  int n, hidden, heads, kv_heads, head_dim;
};

// Whether skinny_qkv_rope_forward takes these operands: 1 ≤ n ≤ kSkinnyMaxRows, hidden a
// multiple of 8, head_dim of 16, residual, norm_weight and w 16-byte aligned, and n normed rows
// fit in a CTA's shared memory.
bool skinny_qkv_rope_fits(const QkvRopeOperands& op);

// Needs skinny_qkv_rope_fits. One kernel on `stream`, allocates nothing: graph-capturable once
// it has run once outside a capture (the first call raises the kernel's shared-memory limit).
void skinny_qkv_rope_forward(const QkvRopeOperands& op, cudaStream_t stream);

}  // namespace ossrl::cuda
