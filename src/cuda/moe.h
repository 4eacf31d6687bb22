// Expert matmuls of the MoE layer over the assignments grouped by expert (cuda/router.h),
// on tensor cores, reading MXFP4 weights directly: each tile of codes and scales is decoded
// to bf16 in shared memory next to the MMA that uses it, never expanded in global memory.
// Also serves bf16 experts. One kernel shape covers decode (a few rows per expert: the
// weights are streamed once, bandwidth bound) and prefill (many rows: a grouped GEMM); MXFP4
// decode with few rows on few experts (20b: batch 1 and 2, down also 4) takes a second kernel
// that streams the weights straight into the MMA's registers.
//
// Per-expert LoRA (the policy's adapters in rollouts, cuda/lora.h's layout): expert e's
// output gains scale · (act · A_eᵀ) · B_eᵀ before its epilogue (so before the SwiGLU of
// gate_up). The kernels first write u [n_tokens*k, r] bf16 = scale · act · A_eᵀ per slot, then
// extend each matmul's reduction by r with B_e as the weight and u as the activation; the
// matmul overlaps the u kernel. At the 20b shape a rank-16 adapter adds 1.4 µs to a decode
// token's gate_up and down, 2-4% at prefill (tests/cuda/moe_bench).
//
// The kernels are programmatic dependents of the work before them (cuda/launch.cuh), which
// callers see as plain stream order, with one precondition: moe_down reads the routing arrays
// before its wait, so they must come from a copy or from a kernel at least two launches back
// on the stream (moe_gate_up_swiglu in between, as in a MoE layer, makes it so).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/lora.h"

namespace ossrl::cuda {

// One layer's experts of one projection, device pointers. W_e is logically [out, in].
struct ExpertWeights {
  bool mxfp4 = true;
  const uint8_t* blocks = nullptr;         // MXFP4: [experts, out, in/32, 16] E2M1, low nibble first
  const uint8_t* scales = nullptr;         // MXFP4: [experts, out, in/32] E8M0
  const __nv_bfloat16* dense = nullptr;    // bf16: [experts, out, in] row-major (transformers'
                                           // [experts, in, out] is transposed at upload)
  const float* bias = nullptr;             // [experts, out]
  int experts = 0;
  int out = 0;
  int in = 0;                              // a multiple of 32
};

// First expert matmul fused with the clamped SwiGLU. For each expert e and each slot j in
// [expert_offsets[e], expert_offsets[e+1]), a = sorted_assignments[j], t = a / k:
//   g = x[t] · W_eᵀ + b_e                         ([2*intermediate], gate even, up odd)
//   gate = min(g[2i], L); up = clamp(g[2i+1], -L, L)        (L = swiglu_limit)
//   h[j, i] = (up + 1) * gate * sigmoid(1.702 * gate)
// x [n_tokens, in] bf16; h [n_tokens*k, out/2] bf16, rows in sorted (expert) order.
// lora (null or inactive: none): the experts' adapter, [experts, r, in] / [experts, out, r]
// with B's rows the logical gate_up rows (gate even, up odd), g += its update; lora_u: scratch
// [n_tokens*k, lora->r] bf16.
void moe_gate_up_swiglu(__nv_bfloat16* h, const __nv_bfloat16* x, const int32_t* sorted_assignments,
                        const int32_t* expert_offsets, int n_tokens, int k, const ExpertWeights& gate_up,
                        float swiglu_limit, cudaStream_t stream, const DeviceAdapter* lora = nullptr,
                        __nv_bfloat16* lora_u = nullptr);

// Second expert matmul: y[a] = h[j] · D_eᵀ + d_e for every slot j of expert e, a =
// sorted_assignments[j]. h [n_tokens*k, in] bf16 in sorted order; y [n_tokens*k, out] fp32 in
// assignment order (row t*k + s). lora, lora_u: as for moe_gate_up_swiglu, y[a] += the
// update of h[j]. The routing arrays: see the precondition above.
void moe_down(float* y, const __nv_bfloat16* h, const int32_t* sorted_assignments, const int32_t* expert_offsets,
              int n_tokens, int k, const ExpertWeights& down, cudaStream_t stream, const DeviceAdapter* lora = nullptr,
              __nv_bfloat16* lora_u = nullptr);

// residual [n, hidden] += Σ_s expert_weight[t, s] · y[t*k + s], s ascending, fp32.
void moe_combine(float* residual, const float* y, const float* expert_weight, int n, int k, int hidden,
                 cudaStream_t stream);

}  // namespace ossrl::cuda
