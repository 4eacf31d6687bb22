#include "engine/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace ossrl {

namespace {

int32_t argmax(std::span<const float> logits) {
  // max_element returns the first maximum: the lowest token id on ties, like torch.argmax.
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

}  // namespace

float token_logprob(std::span<const float> logits, int32_t token) {
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  float sum = 0.0f;
  for (float l : logits) sum += std::exp(l - max_logit);
  return logits[size_t(token)] - max_logit - std::log(sum);
}

std::vector<float> sampling_distribution(std::span<const float> logits, const SamplingParams& params) {
  OSSRL_CHECK(!logits.empty(), "sampling: empty logits row");
  OSSRL_CHECK(params.temperature >= 0.0f && params.top_k >= 0 && params.top_p > 0.0f &&
                  params.top_p <= 1.0f && params.min_p >= 0.0f && params.min_p <= 1.0f,
              "sampling: need temperature >= 0, top_k >= 0, 0 < top_p <= 1, 0 <= min_p <= 1 "
              "(got {}, {}, {}, {})", params.temperature, params.top_k, params.top_p, params.min_p);
  const size_t vocab = logits.size();
  std::vector<float> p(vocab, 0.0f);
  if (params.temperature == 0.0f) {
    p[size_t(argmax(logits))] = 1.0f;
    return p;
  }
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  float sum = 0.0f;
  for (size_t i = 0; i < vocab; ++i) {
    p[i] = std::exp((logits[i] - max_logit) / params.temperature);
    sum += p[i];
  }
  for (float& x : p) x /= sum;

  // Token ids by descending probability, lower id first on ties; only as much of the order
  // as top-k needs, all of it for top-p.
  const bool truncate_k = params.top_k > 0 && size_t(params.top_k) < vocab;
  const bool truncate_p = params.top_p < 1.0f;
  if (truncate_k || truncate_p) {
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    auto by_prob = [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)] || (p[size_t(a)] == p[size_t(b)] && a < b); };
    size_t kept = vocab;
    if (truncate_k && !truncate_p) {
      kept = size_t(params.top_k);
      std::partial_sort(order.begin(), order.begin() + std::ptrdiff_t(kept), order.end(), by_prob);
    } else {
      std::sort(order.begin(), order.end(), by_prob);
      if (truncate_k) kept = size_t(params.top_k);
      float kept_mass = 0.0f;
      for (size_t i = 0; i < kept; ++i) kept_mass += p[size_t(order[i])];
      // The smallest prefix whose share of the kept mass reaches top_p (at least one token).
      float cumulative = 0.0f;
      size_t n = 0;
      while (n < kept && (n == 0 || cumulative < params.top_p * kept_mass)) cumulative += p[size_t(order[n++])];
      kept = n;
    }
    for (size_t i = kept; i < vocab; ++i) p[size_t(order[i])] = 0.0f;
  }
  if (params.min_p > 0.0f) {
    // p_max is the same token before and after truncation, and scaling cancels in the ratio.
    const float threshold = params.min_p * *std::max_element(p.begin(), p.end());
    for (float& x : p) {
      if (x < threshold) x = 0.0f;
    }
  }
  sum = std::accumulate(p.begin(), p.end(), 0.0f);
  for (float& x : p) x /= sum;
  return p;
}

SampledToken sample(std::span<const float> logits, const SamplingParams& params, SamplingRng& rng) {
  const double u = rng.next();
  const std::vector<float> p = sampling_distribution(logits, params);
  // Inverse CDF in token-id order; rounding can leave the total a hair under u, in which
  // case the last token with mass is the answer.
  int32_t token = 0;
  double cumulative = 0.0;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == 0.0f) continue;
    token = int32_t(i);
    cumulative += p[i];
    if (u < cumulative) break;
  }
  return SampledToken{token, token_logprob(logits, token)};
}

}  // namespace ossrl
