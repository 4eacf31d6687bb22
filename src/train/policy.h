// The CPU training model: gpt-oss with LoRA (train/lora.h) over a frozen CpuModel, giving
// per-token log-probs of the next token and their gradient with respect to every trainable
// parameter. It runs the same decoder layer functions as CpuModel (model/cpu/decoder.h),
// so with adapters off (or lora_B = 0) its log-probs are CpuModel::log_probs's.
//
// Memory: forward keeps, per layer, the block inputs, normed inputs, q/k/v, attention
// output and LSE, router logits and choices, and each routed (token, expert)'s gate_up and
// output: about n·(6·hidden + 2·q_dim + 2·kv_dim + k·(2·intermediate + hidden)) floats per
// layer for n tokens (tiny test models: kilobytes). With recompute_activations only each
// layer's input is kept and a layer's activations are rebuilt during backward, one layer at
// a time. The lm_head never forms a [tokens, vocab] block: logits are made a few rows by a
// vocabulary chunk at a time, forward (online log-sum-exp) and backward (recomputed).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "model/cpu/decoder.h"
#include "model/cpu_model.h"
#include "train/lora.h"

namespace ossrl {

struct PolicyOptions {
  // Keep only each layer's input in forward and recompute the layer in backward.
  bool recompute_activations = false;
};

struct PolicyForward {
  // Keep activations for backward (off for reference / old-policy log-probs).
  bool keep_activations = true;
  // Also compute the entropy of each next-token distribution (no gradient flows through it).
  bool entropy = false;
  // LoRA dropout on (when lora_dropout > 0), with masks keyed by dropout_step.
  bool apply_dropout = true;
  uint64_t dropout_step = 0;
  // [tokens] or empty (all): only tokens with score_mask[t] != 0 get a log-prob (and
  // entropy); the rest read 0 and must get dlogp 0 in backward. Each scored token costs a
  // hidden·vocab lm_head row, so a trainer scores only the completion.
  std::span<const uint8_t> score_mask{};
};

struct PolicyOutput {
  // log p(tokens[t] | tokens[offsets[b] .. t)), [tokens]; 0 at each sequence's first token.
  std::vector<float> log_probs;
  // Entropy (nats) of the distribution that predicted tokens[t], [tokens]; 0 at each
  // sequence's first token; empty unless asked for.
  std::vector<float> entropy;
};

// What a trainer needs of a policy, on the CPU (Policy, below) or the GPU
// (train/cuda_policy.h): log-probs and their gradient with respect to the adapters.
class TrainablePolicy {
 public:
  virtual ~TrainablePolicy() = default;
  // A ragged batch of whole sequences (see Policy::forward).
  virtual PolicyOutput forward(std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                               const PolicyForward& options = {}) = 0;
  // dlogp [tokens] of the last forward that kept activations; grads accumulate (+=).
  virtual void backward(std::span<const float> dlogp) = 0;
  virtual void zero_grad() = 0;
  // Off: the base checkpoint alone (the reference policy), no second copy of anything.
  virtual void set_adapters_enabled(bool on) = 0;
  virtual bool adapters_enabled() const = 0;
};

class Policy final : public TrainablePolicy {
 public:
  // base and lora must outlive the policy; lora may be null (the base model alone, nothing
  // to train) and must have been built for base's checkpoint.
  Policy(const CpuModel& base, Lora* lora, PolicyOptions options = {});

  // A ragged batch of whole sequences: sequence b is tokens[offsets[b] .. offsets[b+1]),
  // positions from 0, no padding. Computes log-probs (and entropy when asked) and, with
  // keep_activations, keeps what backward needs (replacing any earlier forward's; a forward
  // without it, e.g. the reference policy's with adapters off, leaves them in place).
  // Uses the Lora's adapters_enabled state and sets its dropout; not thread-safe.
  PolicyOutput forward(std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                       const PolicyForward& options = {}) override;

  // dlogp [tokens] = dLoss/dlog_probs of the last forward (kept activations); entries at
  // sequence starts are ignored. Accumulates (+=) into the grad of every Parameter of the
  // Lora; call Lora::zero_grad between steps. Differentiates the kept forward with the
  // adapters and dropout masks it used (adapters must not have been switched off since).
  // Frees the activations.
  void backward(std::span<const float> dlogp) override;

  // The Lora's grads and adapters_enabled state (no-ops without a Lora).
  void zero_grad() override;
  void set_adapters_enabled(bool on) override;
  bool adapters_enabled() const override;

 private:
  const CpuModel& base_;
  Lora* lora_;
  PolicyOptions options_;

  // The last forward, kept for backward.
  struct Saved {
    std::vector<int32_t> tokens, offsets;
    PolicyForward options;
    bool adapters_enabled = false;
    DecoderActivations decoder;  // the layers' activations (or inputs, when recomputing)
    std::vector<float> hidden;   // [n, hidden] after the final norm (lm_head's input)
    std::vector<float> lse;      // [n] log-sum-exp of the logits that predicted each token
    bool valid = false;
  } saved_;
};

}  // namespace ossrl
