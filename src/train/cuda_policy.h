// The training model on the GPU: the CPU Policy's contract (train/policy.h) — per-token
// log-probs of a ragged batch of whole sequences and their gradient with respect to every
// LoRA value — over the weights the rollout engine uses (one copy, engine/cuda_weights.h).
//
// Memory: forward keeps each layer's input (fp32 [tokens, hidden]) and, for the scored rows,
// the log-sum-exp; backward recomputes one layer at a time (attention block, then the MoE
// block in token chunks, each chunk's forward and backward back to back), so activations
// cost O(tokens · hidden · layers) plus one layer's working set. Where memory allows,
// recompute_activations off keeps every layer's activations instead and saves that
// recompute (a third of the step's FLOPs). The lm_head never forms a [tokens, vocab] tensor (cuda/logprobs.h). Attention is
// flash-style (cuda/flash_attention.h), O(tokens) for any length.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "engine/cuda_model.h"
#include "train/cuda_lora.h"
#include "train/policy.h"

namespace ossrl {

struct CudaPolicyOptions {
  int max_tokens = 4096;       // tokens of one forward (a micro-batch)
  // On: forward keeps each layer's input only and backward recomputes the layer (activation
  // checkpointing, O(tokens · hidden · layers)). Off: forward keeps every layer's activations
  // (~185 KiB a token a layer at the 20b shape) and backward skips the recompute.
  bool recompute_activations = true;
  int moe_chunk_tokens = 4096; // the MoE block's activations are this many tokens at a time
  size_t lm_head_workspace = size_t(256) << 20;  // bytes of logits block (cuda/logprobs.h)
  // Each of the two buffers MXFP4 experts are decoded into for the MoE GEMMs (cuda/moe_train.h).
  size_t moe_stage_bytes = size_t(256) << 20;
};

class CudaPolicy final : public TrainablePolicy {
 public:
  // model and lora must outlive the policy; lora may be null (the base model alone).
  CudaPolicy(const CudaModel& model, DeviceLora* lora, const CudaPolicyOptions& options = {});
  ~CudaPolicy();
  CudaPolicy(const CudaPolicy&) = delete;
  CudaPolicy& operator=(const CudaPolicy&) = delete;

  // Device bytes the policy holds for these options (activations, workspace), for the plan.
  static size_t bytes(const GptOssConfig& config, int lora_r, bool mxfp4_experts, const CudaPolicyOptions& options);
  size_t bytes() const;

  // Off: the base checkpoint alone (the reference policy of the KL term), no second copy.
  void set_adapters_enabled(bool on) override { adapters_enabled_ = on; }
  bool adapters_enabled() const override { return adapters_enabled_; }
  // The DeviceLora's grads.
  void zero_grad() override;

  // As Policy::forward (tokens.size() <= max_tokens). LoRA dropout is not supported on the
  // GPU (DeviceLora rejects it), so options.apply_dropout is ignored.
  PolicyOutput forward(std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                       const PolicyForward& options = {}) override;
  // As Policy::backward: accumulates (+=) into the DeviceLora's grads.
  void backward(std::span<const float> dlogp) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  bool adapters_enabled_ = true;
};

}  // namespace ossrl
