// The loss and the LoRA gradients of one batch of (prompt, completion) sequences: what
// `ossrl grad` computes and writes, so every number of a training step can be checked
// against PyTorch autograd through transformers + PEFT (tests/fixtures/grad-*).
//
// Batch file (JSON):
//   {"sequences": [
//     {"prompt": [ids],                 context, not scored (at least one token)
//      "completion": [ids],             scored tokens (at least one)
//      "completion_mask": [0/1, ...],   optional, default all 1: TRL's tool_mask
//      "advantage": 0.9,                GRPO: the completion's advantage
//      "old_log_probs": [...],          GRPO, optional (all or none): log-probs of the policy
//                                       that sampled it; absent = the current ones, detached
//      "ref_log_probs": [...]}          GRPO, optional (all or none): reference log-probs;
//   ]}                                  absent = computed here with the adapters disabled
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "train/grpo.h"
#include "train/lora.h"
#include "train/policy.h"

namespace ossrl {

struct CompletionSequence {
  std::vector<int32_t> prompt;
  std::vector<int32_t> completion;
  std::vector<uint8_t> completion_mask;  // [completion] 0/1
  float advantage = 0.0f;
  std::vector<float> old_log_probs;      // [completion] or empty
  std::vector<float> ref_log_probs;      // [completion] or empty
};

struct CompletionBatch {
  std::vector<CompletionSequence> sequences;
};

// Parses and checks a batch file: token ids in [0, vocab_size), per-token arrays as long
// as the completion, old/ref log-probs given for all sequences or none. Errors name the file
// and the sequence.
CompletionBatch read_completion_batch(const std::string& path, int vocab_size);

enum class LossKind { Sft, Grpo };

struct LossSpec {
  LossKind kind = LossKind::Sft;
  GrpoLossConfig grpo;  // for Grpo
};

struct BatchGrad {
  double loss = 0;
  std::vector<float> log_probs;      // [N] completion tokens with the adapters, concatenated
  std::vector<float> ref_log_probs;  // [N] the reference's; empty unless GRPO with beta != 0
  GrpoLossMetrics metrics;           // GRPO only
};

// Zeroes the policy's grads, runs the reference forward (GRPO, beta != 0, no ref_log_probs in
// the batch: adapters disabled, no activations kept), the policy forward, the loss, and the
// backward, so the policy's adapters' grads hold dLoss/d(each parameter).
// SFT: -sum(mask * logp) / sum(mask). GRPO: grpo_loss with advantages, old and ref log-probs
// from the batch; dapo's token count is this batch's.
BatchGrad batch_grad(TrainablePolicy& policy, const CompletionBatch& batch, const LossSpec& spec);

// `ossrl grad`'s output, one safetensors file: every gradient under its PEFT tensor name
// (peft_adapter.h; sinks under base_model.model.model.layers.<l>.self_attn.sinks), and
// "loss" F32 [], "log_probs" F32 [N], "ref_log_probs" F32 [N] when computed.
void write_batch_grad(const std::string& path, const Lora& lora, const BatchGrad& result);

}  // namespace ossrl
