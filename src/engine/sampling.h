// Choosing the next token from a row of logits: temperature, top-k, top-p, min-p, greedy at
// temperature 0, with a seeded per-sequence random stream so a rollout can be replayed.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace ossrl {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy (argmax, lowest token id on ties)
  int top_k = 0;             // keep the k most probable tokens; 0: off
  float top_p = 1.0f;        // keep the smallest most-probable set with mass >= top_p; 1: off
  float min_p = 0.0f;        // keep tokens with p >= min_p * p_max; 0: off
};

// Uniform deviates for one sequence. Counter-based (draw i is a fixed function of seed,
// stream and i), so a sequence's draws do not depend on which other sequences share its
// batch or on the standard library, and a run replays bit for bit.
class SamplingRng {
 public:
  explicit SamplingRng(uint64_t seed, uint64_t stream = 0);
  // The next deviate in [0, 1).
  double next();

 private:
  uint64_t key_;
  uint64_t counter_ = 0;
};

// The distribution sample() draws from, [vocab]: softmax(logits / temperature), then top-k,
// then top-p over what is left, then min-p, renormalised; masked tokens have probability 0.
// Ties in rank go to the lower token id. At temperature 0: one-hot on the argmax.
std::vector<float> sampling_distribution(std::span<const float> logits, const SamplingParams& params);

struct SampledToken {
  int32_t token = 0;
  // log softmax(logits)[token]: the model's own log-probability at temperature 1, before any
  // temperature or truncation. It is the policy probability GRPO's importance ratio compares
  // with the trainer's recomputation, which sees only the model, never the sampler settings.
  float logprob = 0.0f;
};

// Draws one token from sampling_distribution(logits, params) with one deviate of `rng` (one
// is consumed at every temperature, greedy included, so streams stay aligned).
SampledToken sample(std::span<const float> logits, const SamplingParams& params, SamplingRng& rng);

// log softmax(logits)[token], fp32 with the max subtracted.
float token_logprob(std::span<const float> logits, int32_t token);

}  // namespace ossrl
