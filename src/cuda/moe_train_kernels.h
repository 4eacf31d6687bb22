// The kernels of the MoE training block (cuda/moe_train.h), launched by moe_train.cpp around
// its cuBLAS GEMMs. "Rows" are the n*k (token, slot) assignments in cuda/router.h's grouped
// order: expert e owns rows [offsets[e], offsets[e+1]) of every [rows, *] matrix here.
//
// The LoRA matmuls have one skinny dimension (the rank r), so they are bandwidth bound and
// are fused where possible: x · Aᵀ and dy · B are their own pass (lora_project), the rank-r
// update of a GEMM's output rides on the epilogue that reads that output anyway, and the
// weight grads reduce over each expert's rows (lora_weight_grad). All on tensor cores (bf16
// operands, fp32 accumulation), r of any size in tiles of up to 64.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/moe.h"

namespace ossrl::cuda::moe_train {

// The experts a launch covers, first .. first + experts - 1, and where their rows are: device
// offsets [all experts + 1]; max_rows (the most rows of one of them, known on the host) sizes
// the grids.
struct ExpertRows {
  const int32_t* offsets = nullptr;
  int experts = 0;
  int max_rows = 0;
  int first = 0;
};

// One expert factor of an adapter read as l_e(c, q): c along the projection's features, q < r
// along the rank; element data[e*stride_e + c*stride_c + q*stride_q]. A [experts, r, in] is
// (r*in, 1, in), B [experts, out, r] is (out*r, r, 1); the grads share their layouts.
template <class T>
struct RankOperand {
  T* data = nullptr;
  int64_t stride_e = 0, stride_c = 0, stride_q = 0;
};

// acc[j, c] += alpha · Σ_q u[j, q] · l_e(c, q) for the rows j of expert e; u [rows, r] bf16.
// u == null: no update.
struct LowRankUpdate {
  const __nv_bfloat16* u = nullptr;
  RankOperand<const __nv_bfloat16> l;
  int r = 0;
  float alpha = 0.0f;
};

// Experts to decode, in stage order (kernel argument: no upload).
inline constexpr int kMaxStageExperts = 256;
struct StageList {
  int count = 0;
  int16_t expert[kMaxStageExperts] = {};
};

// xs [rows, hidden] bf16: xs[j] = xn[sorted[j] / k]; position [rows]: position[sorted[j]] = j
// (where assignment a = t*k + s sits in the grouped order).
void gather_rows(__nv_bfloat16* xs, int32_t* position, const __nv_bfloat16* xn, const int32_t* sorted, int rows, int k,
                 int hidden, cudaStream_t stream);

// stage [list.count, out, in] bf16 = MXFP4 experts list.expert[i] of w, bit for bit io/mxfp4's
// decode (scales 0 and 255 included).
void decode_mxfp4_experts(__nv_bfloat16* stage, const ExpertWeights& w, const StageList& list, cudaStream_t stream);

// u [rows, r] bf16 = alpha · x [rows, K] · m_e per expert: u[j, q] = alpha Σ_c x[j, c] m_e(c, q).
// K a multiple of 8.
void lora_project(__nv_bfloat16* u, const __nv_bfloat16* x, int K, RankOperand<const __nv_bfloat16> m, int r,
                  float alpha, const ExpertRows& rows, cudaStream_t stream);

// grad_e(c, q) += alpha Σ_j p[j, c] · q[j, q] over expert e's rows; p [rows, width] bf16 (width
// a multiple of 8), q [rows, r] bf16. Each grad element has one writer (deterministic).
void lora_weight_grad(RankOperand<float> grad, const __nv_bfloat16* p, int width, const __nv_bfloat16* q, int r,
                      float alpha, const ExpertRows& rows, cudaStream_t stream);

// Epilogues of the expert GEMMs; acc [rows, width] fp32 is a GEMM's output, plus `update`.
//
// gate_up forward: with v = acc + bias_e (+ update), gate = v[2i], up = v[2i+1]:
//   g [rows, 2I] bf16 = v, rounded so that each value stays on its side of the clamp bounds
//   (backward's torch.clamp mask is then the forward's fp32 one);
//   h [rows, I] bf16 = (clamp(up) + 1) * min(gate, L) * sigmoid(1.702 * min(gate, L)).
void gate_up_epilogue(__nv_bfloat16* g, __nv_bfloat16* h, const float* acc, const float* bias,
                      const LowRankUpdate& update, int intermediate, float limit, const ExpertRows& rows,
                      cudaStream_t stream);
// out[row_map ? row_map[j] : j] = acc[j] + bias_e (bias may be null) + update; out [rows, width]
// fp32, may be acc itself when row_map is null.
void store_rows_epilogue(float* out, const float* acc, int width, const float* bias, const int32_t* row_map,
                         const LowRankUpdate& update, const ExpertRows& rows, cudaStream_t stream);
// dg [rows, 2I] bf16 = swiglu backward of dh = acc + update [rows, I], given g from
// gate_up_epilogue (torch.clamp's convention at the bounds, as model/cpu/moe.cpp).
void swiglu_backward_epilogue(__nv_bfloat16* dg, const float* acc, const __nv_bfloat16* g,
                              const LowRankUpdate& update, int intermediate, float limit, const ExpertRows& rows,
                              cudaStream_t stream);

// Router backward and the expert rows' output gradient, per token t (s < k, a = t*k + s):
//   dw_s = dout[t] · y[a];  dlogit_s = w_s (dw_s - Σ_s' w_s' dw_s')   (softmax over the k)
//   dxn[t] = Σ_s dlogit_s · router_weight[expert_index[a]]             (overwritten, fp32)
//   dys[position[a]] = bf16(w_s · dout[t])                              (grouped order)
// y [n*k, hidden] fp32 in assignment order. k <= 8.
void router_backward(float* dxn, __nv_bfloat16* dys, const float* dout, const float* y, const int32_t* expert_index,
                     const float* expert_weight, const int32_t* position, const __nv_bfloat16* router_weight, int n,
                     int k, int hidden, cudaStream_t stream);

// dxn[t] += Σ_s dxs[position[t*k + s]], s ascending; dxs [n*k, hidden] fp32 in grouped order.
void sum_expert_rows(float* dxn, const float* dxs, const int32_t* position, int n, int k, int hidden,
                     cudaStream_t stream);

}  // namespace ossrl::cuda::moe_train
