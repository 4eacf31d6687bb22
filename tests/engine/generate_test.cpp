// The generation loop on a random tiny model: greedy decoding agrees with re-running the
// full forward on the growing sequence, log-probs agree with CpuModel::log_probs, stop
// tokens end a sequence, and seeded sampling replays.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "engine/generate.h"
#include "model/tiny_model.h"

namespace ossrl {
namespace {

class GenerateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { dir_ = testing::tiny_checkpoint("generate", {.seed = 11}); }
  static inline std::string dir_;
  const std::vector<std::vector<int32_t>> prompts_ = {{5, 17, 3}, {40}, {1, 2, 3, 4, 5, 6, 7, 8, 9}};
};

TEST_F(GenerateTest, GreedyMatchesFullForwardAndLogProbs) {
  CpuModel model(dir_);
  GenerateOptions options;
  options.sampling.temperature = 0.0f;
  options.max_new_tokens = 12;  // past the sliding window of 4
  const std::vector<Generation> out = generate(model, prompts_, options);
  ASSERT_EQ(out.size(), prompts_.size());
  for (size_t i = 0; i < prompts_.size(); ++i) {
    ASSERT_EQ(out[i].tokens.size(), 12u);
    EXPECT_FALSE(out[i].stopped);
    std::vector<int32_t> seq = prompts_[i];
    seq.insert(seq.end(), out[i].tokens.begin(), out[i].tokens.end());
    const int32_t offsets[] = {0, int32_t(seq.size())};
    KvCache cache = model.new_cache();
    KvCache* caches[] = {&cache};
    const std::vector<float> logits = model.forward(seq, offsets, caches, LogitsFor::AllTokens);
    const std::vector<float> lp = model.log_probs(seq, offsets);
    const size_t vocab = size_t(model.config().vocab_size);
    for (size_t t = 0; t < out[i].tokens.size(); ++t) {
      const size_t row = prompts_[i].size() - 1 + t;
      const auto begin = logits.begin() + std::ptrdiff_t(row * vocab);
      EXPECT_EQ(out[i].tokens[t], int32_t(std::max_element(begin, begin + std::ptrdiff_t(vocab)) - begin));
      EXPECT_NEAR(out[i].logprobs[t], lp[row + 1], 1e-5);
    }
  }
}

TEST_F(GenerateTest, StopTokenEndsOnlyItsSequence) {
  CpuModel model(dir_);
  GenerateOptions options;
  options.sampling.temperature = 0.0f;
  options.max_new_tokens = 6;
  const std::vector<Generation> free_run = generate(model, prompts_, options);
  // Stop on prompt 0's third greedy token, unless another sequence would meet it first.
  options.stop_tokens = {free_run[0].tokens[2], 100000};
  const std::vector<Generation> stopped = generate(model, prompts_, options);
  for (size_t i = 0; i < prompts_.size(); ++i) {
    const auto& tokens = free_run[i].tokens;
    const auto hit = std::find(tokens.begin(), tokens.end(), options.stop_tokens[0]);
    const size_t want_len = hit == tokens.end() ? tokens.size() : size_t(hit - tokens.begin()) + 1;
    EXPECT_EQ(stopped[i].tokens, std::vector<int32_t>(tokens.begin(), tokens.begin() + std::ptrdiff_t(want_len)));
    EXPECT_EQ(stopped[i].stopped, hit != tokens.end());
    EXPECT_EQ(stopped[i].logprobs.size(), stopped[i].tokens.size());
  }
  EXPECT_TRUE(stopped[0].stopped);
  EXPECT_LE(stopped[0].tokens.size(), 3u);
}

TEST_F(GenerateTest, SeededSamplingReplays) {
  CpuModel model(dir_);
  GenerateOptions options;
  options.sampling.temperature = 1.0f;
  options.sampling.top_p = 0.95f;
  options.max_new_tokens = 10;
  options.seed = 123;
  const auto a = generate(model, prompts_, options);
  const auto b = generate(model, prompts_, options);
  for (size_t i = 0; i < prompts_.size(); ++i) {
    EXPECT_EQ(a[i].tokens, b[i].tokens);
    EXPECT_EQ(a[i].logprobs, b[i].logprobs);
  }
  options.seed = 124;
  const auto c = generate(model, prompts_, options);
  bool any_differs = false;
  for (size_t i = 0; i < prompts_.size(); ++i) any_differs |= a[i].tokens != c[i].tokens;
  EXPECT_TRUE(any_differs);
}

TEST_F(GenerateTest, ZeroNewTokensAndEmptyBatch) {
  CpuModel model(dir_);
  GenerateOptions options;
  options.max_new_tokens = 0;
  const auto out = generate(model, prompts_, options);
  ASSERT_EQ(out.size(), prompts_.size());
  for (const Generation& g : out) EXPECT_TRUE(g.tokens.empty());
  EXPECT_TRUE(generate(model, {}, GenerateOptions{}).empty());
}

}  // namespace
}  // namespace ossrl
