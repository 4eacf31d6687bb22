#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "engine/sampling.h"

namespace ossrl {
namespace {

// Logits whose softmax is exactly-ish the given probabilities.
std::vector<float> logits_of(const std::vector<double>& p) {
  std::vector<float> l;
  for (double x : p) l.push_back(float(std::log(x)));
  return l;
}

std::vector<bool> kept(const std::vector<float>& p) {
  std::vector<bool> k;
  for (float x : p) k.push_back(x > 0.0f);
  return k;
}

const std::vector<double> kProbs = {0.15, 0.5, 0.05, 0.3};  // order by rank: 1, 3, 0, 2

TEST(Sampling, TemperatureZeroIsArgmaxLowestIdOnTies) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f};
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  EXPECT_EQ(sampling_distribution(logits, greedy), (std::vector<float>{0, 1, 0, 0}));
  SamplingRng rng(1);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(sample(logits, greedy, rng).token, 1);
}

TEST(Sampling, TemperatureSharpensAndFlattens) {
  const auto logits = logits_of(kProbs);
  for (float t : {0.5f, 2.0f}) {
    SamplingParams params;
    params.temperature = t;
    const std::vector<float> p = sampling_distribution(logits, params);
    double z = 0;
    for (double x : kProbs) z += std::pow(x, 1.0 / t);
    for (size_t i = 0; i < kProbs.size(); ++i) EXPECT_NEAR(p[i], std::pow(kProbs[i], 1.0 / t) / z, 1e-6);
  }
}

TEST(Sampling, TopKKeepsTheKMostProbable) {
  SamplingParams params;
  params.top_k = 2;
  const std::vector<float> p = sampling_distribution(logits_of(kProbs), params);
  EXPECT_EQ(kept(p), (std::vector<bool>{false, true, false, true}));
  EXPECT_NEAR(p[1], 0.5 / 0.8, 1e-6);
  EXPECT_NEAR(p[3], 0.3 / 0.8, 1e-6);
  params.top_k = 10;  // wider than the vocabulary: no-op
  EXPECT_EQ(kept(sampling_distribution(logits_of(kProbs), params)), (std::vector<bool>(4, true)));
}

TEST(Sampling, TopPKeepsTheSmallestSetReachingP) {
  SamplingParams params;
  params.top_p = 0.75f;  // 0.5 + 0.3 reaches it
  EXPECT_EQ(kept(sampling_distribution(logits_of(kProbs), params)), (std::vector<bool>{false, true, false, true}));
  params.top_p = 0.85f;  // needs 0.15 too
  EXPECT_EQ(kept(sampling_distribution(logits_of(kProbs), params)), (std::vector<bool>{true, true, false, true}));
  params.top_p = 0.1f;  // the top token alone
  EXPECT_EQ(kept(sampling_distribution(logits_of(kProbs), params)), (std::vector<bool>{false, true, false, false}));
}

TEST(Sampling, TopPAppliesToWhatTopKLeft) {
  SamplingParams params;
  params.top_k = 2;     // {0.5, 0.3} renormalised to {0.625, 0.375}
  params.top_p = 0.6f;  // 0.625 alone reaches it
  EXPECT_EQ(kept(sampling_distribution(logits_of(kProbs), params)), (std::vector<bool>{false, true, false, false}));
}

TEST(Sampling, MinPIsRelativeToTheTopProbability) {
  SamplingParams params;
  params.min_p = 0.2f;  // threshold 0.1: drops 0.05
  const std::vector<float> p = sampling_distribution(logits_of(kProbs), params);
  EXPECT_EQ(kept(p), (std::vector<bool>{true, true, false, true}));
  EXPECT_NEAR(p[1], 0.5 / 0.95, 1e-6);
  params.min_p = 0.7f;  // threshold 0.35: only 0.5
  EXPECT_EQ(kept(sampling_distribution(logits_of(kProbs), params)), (std::vector<bool>{false, true, false, false}));
}

TEST(Sampling, RejectsBadParameters) {
  SamplingParams params;
  params.top_p = 0.0f;
  EXPECT_THROW(sampling_distribution(logits_of(kProbs), params), std::exception);
  params = {};
  params.temperature = -1.0f;
  EXPECT_THROW(sampling_distribution(logits_of(kProbs), params), std::exception);
}

TEST(Sampling, SeededAndDeterministic) {
  const auto logits = logits_of(kProbs);
  auto draw = [&](uint64_t seed, uint64_t stream) {
    SamplingRng rng(seed, stream);
    std::vector<int32_t> tokens;
    for (int i = 0; i < 64; ++i) tokens.push_back(sample(logits, {}, rng).token);
    return tokens;
  };
  EXPECT_EQ(draw(42, 0), draw(42, 0));
  EXPECT_NE(draw(42, 0), draw(43, 0));
  EXPECT_NE(draw(42, 0), draw(42, 1));
  // Fixed values: the generator is specified here, not by the standard library.
  SamplingRng rng(42);
  const double first = rng.next();
  EXPECT_GE(first, 0.0);
  EXPECT_LT(first, 1.0);
  SamplingRng again(42);
  EXPECT_EQ(again.next(), first);
}

TEST(Sampling, FrequenciesFollowTheDistribution) {
  const auto logits = logits_of(kProbs);
  SamplingParams params;
  params.top_k = 3;  // sample from {0.15, 0.5, 0.3} / 0.95
  SamplingRng rng(7);
  std::vector<int> counts(4, 0);
  const int n = 40000;
  for (int i = 0; i < n; ++i) ++counts[size_t(sample(logits, params, rng).token)];
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(counts[0] / double(n), 0.15 / 0.95, 0.01);
  EXPECT_NEAR(counts[1] / double(n), 0.5 / 0.95, 0.01);
  EXPECT_NEAR(counts[3] / double(n), 0.3 / 0.95, 0.01);
}

TEST(Sampling, LogProbIsUnderTheUnmodifiedDistribution) {
  // Whatever the sampler settings, the reported log-prob is log softmax(logits)[token].
  const auto logits = logits_of(kProbs);
  SamplingParams params;
  params.temperature = 0.5f;
  params.top_k = 2;
  SamplingRng rng(3);
  for (int i = 0; i < 20; ++i) {
    const SampledToken s = sample(logits, params, rng);
    EXPECT_NEAR(s.logprob, std::log(kProbs[size_t(s.token)]), 1e-6);
  }
  const std::vector<float> shifted = {1000.0f, 1001.0f};  // stable at large logits
  EXPECT_NEAR(token_logprob(shifted, 0), -std::log1p(std::exp(1.0)), 1e-5);
}

}  // namespace
}  // namespace ossrl
