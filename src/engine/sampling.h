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
  explicit SamplingRng(uint64_t seed, uint64_t stream = 0) : key_(mix64(mix64(seed) + stream * kGolden)) {}
  // The next deviate in [0, 1).
  double next() { return uniform(key_, ++draws_); }

  // The stream's identity and how many deviates it has given: the GPU sampler reproduces
  // the next one as uniform(key(), draws() + 1).
  uint64_t key() const { return key_; }
  uint64_t draws() const { return draws_; }

  // SplitMix64's finaliser: a bijection that scrambles every input bit into every output bit.
  static constexpr uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Deviate number `draw` (counted from 1) of the stream `key`: 53 random bits in [0, 1).
  // constexpr, so CUDA kernels call it too and draw the very same numbers.
  static constexpr double uniform(uint64_t key, uint64_t draw) {
    return double(mix64(key + draw * kGolden) >> 11) * 0x1.0p-53;
  }

 private:
  static constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;
  uint64_t key_;
  uint64_t draws_ = 0;
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
