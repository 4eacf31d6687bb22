// The dense bf16 matmul for a few rows of x (decode steps): a bandwidth-bound kernel that
// streams W once at close to the memory's speed, where cuBLAS's GEMM tiles (made for many
// rows) reach about half of it. cuda/linear.h's linear_forward picks it by itself; call it
// directly only to compare kernels.
#pragma once

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

}  // namespace ossrl::cuda
