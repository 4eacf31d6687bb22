// The MoE block of a decoder layer for training on the GPU: forward keeping what backward
// needs, and backward through the frozen experts (MXFP4 or bf16) and through the router's
// softmax over the chosen k, with LoRA per expert on gate_up_proj and down_proj. The math is
// model/cpu/moe.h's (the oracle); the rollout engine's forward is cuda/moe.h.
//
// Training shapes are large (hundreds of rows per expert), so the work is GEMM bound: the
// routing is copied to the host once per call and every expert matmul, forward and backward,
// runs as a GEMM per expert over its row range (cuBLAS, spread over streams); the LoRA matmuls
// run grouped over all experts in one launch each (moe_train.cpp says how). MXFP4 experts are
// decoded to bf16 into a bounded stage (MoeTrainDims::mxfp4_stage_bytes), a chunk of experts at
// a time, bit-exact; the rollout kernels (cuda/moe.h) decode in registers instead.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/buffer.h"
#include "cuda/linear.h"
#include "cuda/lora.h"
#include "cuda/moe.h"

namespace ossrl::cuda {

struct MoeTrainDims {
  int hidden = 0;
  int intermediate = 0;  // per expert
  int experts = 0;
  int k = 0;             // experts per token
  float swiglu_limit = 7.0f;
  int lora_r = 0;        // rank of the expert adapters (0: none); sizes their activations
  // MXFP4 experts are decoded to bf16, a chunk of experts at a time, into two buffers of this
  // many bytes each (one is decoded while the other's GEMMs run); each holds at least one
  // expert. 0: bf16 experts only, no buffers. The default holds 8 experts of gpt-oss's gate_up.
  size_t mxfp4_stage_bytes = size_t(256) << 20;
};

// One layer's frozen MoE weights.
struct MoeTrainWeights {
  const __nv_bfloat16* router_weight = nullptr;  // [experts, hidden]
  const float* router_bias = nullptr;            // [experts]
  ExpertWeights gate_up;                         // [experts, 2*intermediate, hidden], gate even rows
  ExpertWeights down;                            // [experts, hidden, intermediate]
};

// One forward's activations, kept for its backward (one layer's call of up to max_tokens
// tokens): the routing (each token's experts and weights, where each (token, slot) sits in the
// grouped order, the experts' row offsets on the device and the host), the gathered rows xs,
// the gate_up pre-activations g, the SwiGLU outputs h, the expert outputs y and the LoRA u's.
// None of the scratch (router logits, GEMM outputs, MXFP4 stages, backward's gradients), which
// stays in the MoeTrainBlock and is shared by every call. With these kept per layer, backward
// needs no recompute of the forward.
//
// Bytes per token (bytes() / max_tokens, plus (experts + 1) * 4 once): k * (12 + 6 * hidden
// + 6 * intermediate + 4 * lora_r); at gpt-oss-20b's shape (hidden 2880, intermediate 2880,
// top-4) 138,288 + 16 * lora_r: 138,544 at r 16 (135.3 KiB; 1024 tokens 135.3 MiB).
class MoeTrainActivations {
 public:
  MoeTrainActivations(const MoeTrainDims& dims, int max_tokens);
  // Bytes the constructor allocates on the device, for the memory plan.
  static size_t bytes(const MoeTrainDims& dims, int max_tokens);

  struct State;  // moe_train.cpp defines it

 private:
  friend class MoeTrainBlock;
  State* state_;  // owned
 public:
  ~MoeTrainActivations();
  MoeTrainActivations(const MoeTrainActivations&) = delete;
  MoeTrainActivations& operator=(const MoeTrainActivations&) = delete;
};

// Holds the scratch of the expert matmuls and one call's activations of its own: run forward
// then backward per layer (recomputing), and one instance serves every layer. Or keep each
// layer's activations in a MoeTrainActivations of its own (forward's `keep`, backward's
// `from`): then any number of forwards may precede their backwards, in any order.
class MoeTrainBlock {
 public:
  MoeTrainBlock(const MoeTrainDims& dims, int max_tokens);
  // Bytes the constructor allocates, for the memory plan: the scratch plus one call's
  // activations (MoeTrainActivations::bytes) of its own.
  static size_t bytes(const MoeTrainDims& dims, int max_tokens);

  // residual [n, hidden] fp32 += Σ_s weight_s · expert_s(xn[t]) over each token's top-k,
  // xn [n, hidden] bf16 (post_attention_layernorm's output). gate_up / down: the layer's
  // expert adapters (null or inactive: none). Keeps the activations backward needs in `keep`
  // (built for the block's dims and at least n tokens), or, when null, in the block's own,
  // replacing the last call's. n <= max_tokens.
  void forward(Blas& blas, float* residual, const __nv_bfloat16* xn, int n, const MoeTrainWeights& w,
               const DeviceAdapter* gate_up, const DeviceAdapter* down, MoeTrainActivations* keep = nullptr);

  // Backward of the forward that kept `from` (null: the block's own, i.e. the last forward with
  // no `keep`), given the same xn, n, weights and adapters: dxn [n, hidden] fp32 (16-byte
  // aligned) is overwritten with dL/dxn given dout [n, hidden] fp32 = dL/d(block output),
  // through the experts and their adapters and through the k softmax weights into the router
  // logits (the choice of experts is not differentiated). Accumulates (+=) the adapters' grads.
  // xn's rows are read from the copy the forward gathered, so xn must not have changed. `from`
  // stays valid: a second backward from it gives the same result.
  void backward(Blas& blas, float* dxn, const float* dout, const __nv_bfloat16* xn, int n, const MoeTrainWeights& w,
                const DeviceAdapter* gate_up, const DeviceAdapter* down, const MoeTrainActivations* from = nullptr);

 private:
  struct Impl;
  Impl* impl_;  // owned; the .cpp defines it
 public:
  ~MoeTrainBlock();
  MoeTrainBlock(const MoeTrainBlock&) = delete;
  MoeTrainBlock& operator=(const MoeTrainBlock&) = delete;
};

}  // namespace ossrl::cuda
