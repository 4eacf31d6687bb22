// LoRA on the GPU: the device layout of an adapter, and the low-rank update of a dense linear
// layer, forward and backward, through cuBLAS (the per-expert adapters of the MoE are applied
// by cuda/moe.h in rollouts and cuda/moe_train.h in training, over the same layout).
//
// Precision: fp32 master weights and grads (what the optimizer updates); the GEMMs read bf16
// copies of A and B, refreshed from the masters after every optimizer step, with fp32
// accumulation, as PEFT runs under bf16 autocast.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/linear.h"

namespace ossrl::cuda {

// One adapted projection: y += scale · (x · Aᵀ) · Bᵀ per expert. Attention projections have
// experts = 1; gate_up_proj / down_proj have one (A, B) pair per expert, stacked.
struct DeviceAdapter {
  int experts = 0;
  int r = 0;
  int in = 0;
  int out = 0;
  float scale = 0.0f;  // lora_alpha / r (or / sqrt(r) with rsLoRA)
  // fp32 masters: the optimizer's; null when the optimizer state lives on the host (the
  // GEMMs read only the bf16 copies a16 / b16, never these).
  float* a = nullptr;              // [experts, r, in] fp32 master
  float* b = nullptr;              // [experts, out, r] fp32 master
  float* grad_a = nullptr;         // [experts, r, in] fp32, accumulated (+=)
  float* grad_b = nullptr;         // [experts, out, r] fp32, accumulated (+=)
  __nv_bfloat16* a16 = nullptr;    // [experts, r, in] bf16 copy of a
  __nv_bfloat16* b16 = nullptr;    // [experts, out, r] bf16 copy of b
  bool active() const { return a16 != nullptr; }
};

// Everything trainable in one decoder layer on the GPU (inactive adapters: a == null).
// gate_up_proj's B rows are the checkpoint's logical rows: gate even, up odd.
struct DeviceLayerAdapters {
  DeviceAdapter q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj;
  // Trained sinks [heads] fp32 replacing the checkpoint's, and their grad; null: the
  // checkpoint's sinks, not trained.
  float* sinks = nullptr;
  float* grad_sinks = nullptr;
};

// y [n, out] (row stride ldy) += scale · (x [n, in] · Aᵀ) · Bᵀ, x bf16 with row stride `in`.
// u [n, r] bf16 receives x · Aᵀ (backward reads it). Single-expert adapters only. A no-op
// when !ad.active(). Graph capturable (no allocation, no sync).
void lora_forward(Blas& blas, float* y, int ldy, const __nv_bfloat16* x, int n, const DeviceAdapter& ad,
                  __nv_bfloat16* u);

// Backward of lora_forward given dy [n, out] bf16 (row stride ld_dy), the forward's x and u:
//   grad_b [out, r] += scale · dyᵀ · u
//   v [n, r] = scale · dy · B                         (bf16 scratch)
//   grad_a [r, in] += vᵀ · x
//   dx [n, in] fp32 (row stride in) += v · A           (dx may be null)
void lora_backward(Blas& blas, float* dx, const __nv_bfloat16* dy, int ld_dy, const __nv_bfloat16* x,
                   const __nv_bfloat16* u, int n, const DeviceAdapter& ad, __nv_bfloat16* v);

}  // namespace ossrl::cuda
