// The CPU generation loop: prefill a batch of prompts in one ragged forward, then decode one
// token per unfinished sequence per step through each sequence's KV cache.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/sampling.h"
#include "model/cpu_model.h"

namespace ossrl {

struct GenerateOptions {
  SamplingParams sampling;
  int max_new_tokens = 256;
  // A sequence ends when it samples one of these (the caller passes Harmony's <|return|>
  // 200002 and <|call|> 200012).
  std::vector<int32_t> stop_tokens;
  // Prompt i samples from SamplingRng(seed, i): the same seed and prompts give the same
  // completions.
  uint64_t seed = 0;
};

struct Generation {
  // The generated tokens, the stop token included when one ended the sequence: it is part of
  // the policy's action and its log-prob belongs to the rollout.
  std::vector<int32_t> tokens;
  // logprobs[i] = log p(tokens[i] | prompt, tokens[<i]) under the model at temperature 1,
  // untruncated (see SampledToken::logprob).
  std::vector<float> logprobs;
  bool stopped = false;  // true: ended on a stop token; false: reached max_new_tokens
};

// One Generation per prompt, in order. Every prompt must hold at least one token. adapters
// (one per layer, or empty) run the model with LoRA: the trainer's current policy.
std::vector<Generation> generate(CpuModel& model, const std::vector<std::vector<int32_t>>& prompts,
                                 const GenerateOptions& options,
                                 std::span<const LayerAdapters* const> adapters = {});

}  // namespace ossrl
