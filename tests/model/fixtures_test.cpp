// The CPU reference against transformers: every model folder under tests/fixtures/ that
// holds a checkpoint (config.json) and a reference.safetensors (made by
// scripts/fixtures/make_fixtures.py with transformers in fp32) is one case of this sweep.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <vector>

#include "engine/generate.h"
#include "io/safetensors.h"
#include "reference_fixtures.h"
#include "model/cpu_model.h"

namespace ossrl {
namespace {

using test::read;
using test::fixture_models;

// Logits and log-probs: max abs error over max |reference| must stay under this.
constexpr float kRelativeTolerance = 1e-3f;

struct Error {
  float max_abs = 0;
  float max_ref = 0;
  float relative() const { return max_abs / std::max(max_ref, 1e-30f); }
};

Error compare(std::span<const float> got, std::span<const float> want) {
  EXPECT_EQ(got.size(), want.size());
  Error e;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    e.max_abs = std::max(e.max_abs, std::abs(got[i] - want[i]));
    e.max_ref = std::max(e.max_ref, std::abs(want[i]));
  }
  return e;
}

TEST(Fixtures, FolderHoldsReferenceModels) {
  // An empty folder would make the sweep below pass vacuously.
  ASSERT_FALSE(fixture_models().empty())
      << "no */reference.safetensors under " << OSSRL_FIXTURE_DIR
      << ": run scripts/fixtures/make_fixtures.py (see tests/fixtures/README.md)";
}

class TransformersFixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = std::string(OSSRL_FIXTURE_DIR) + "/" + GetParam();
    model_ = std::make_unique<CpuModel>(dir_);
    ref_ = SafetensorsFile::open(dir_ + "/reference.safetensors");
    tokens_ = read<int32_t>(*ref_, "tokens");
    offsets_ = read<int32_t>(*ref_, "offsets");
  }
  void report(const std::string& what, const Error& e) {
    std::cout << "[ fixture  ] " << GetParam() << " " << what << ": max abs error " << e.max_abs
              << ", max |reference| " << e.max_ref << ", relative " << e.relative() << "\n";
    RecordProperty(what + "_max_abs_error", std::to_string(e.max_abs));
    RecordProperty(what + "_relative_error", std::to_string(e.relative()));
  }
  std::vector<KvCache*> fresh_caches(std::vector<KvCache>& storage, size_t n) {
    storage.assign(n, model_->new_cache());
    std::vector<KvCache*> ptrs;
    for (KvCache& c : storage) ptrs.push_back(&c);
    return ptrs;
  }

  std::string dir_;
  std::unique_ptr<CpuModel> model_;
  std::unique_ptr<SafetensorsFile> ref_;
  std::vector<int32_t> tokens_, offsets_;
};

TEST_P(TransformersFixture, RaggedBatchLogits) {
  std::vector<KvCache> storage;
  const std::vector<float> logits =
      model_->forward(tokens_, offsets_, fresh_caches(storage, offsets_.size() - 1), LogitsFor::AllTokens);
  const Error e = compare(logits, read<float>(*ref_, "logits"));
  report("logits", e);
  EXPECT_LE(e.relative(), kRelativeTolerance);
}

TEST_P(TransformersFixture, LogProbs) {
  const Error e = compare(model_->log_probs(tokens_, offsets_), read<float>(*ref_, "logprobs"));
  report("logprobs", e);
  EXPECT_LE(e.relative(), kRelativeTolerance);
}

TEST_P(TransformersFixture, RaggedBatchEqualsEachSequenceAlone) {
  std::vector<KvCache> storage;
  const std::vector<float> ragged =
      model_->forward(tokens_, offsets_, fresh_caches(storage, offsets_.size() - 1), LogitsFor::AllTokens);
  const size_t vocab = size_t(model_->config().vocab_size);
  for (size_t b = 0; b + 1 < offsets_.size(); ++b) {
    const auto seq = std::span(tokens_).subspan(size_t(offsets_[b]), size_t(offsets_[b + 1] - offsets_[b]));
    const int32_t offsets[] = {0, int32_t(seq.size())};
    const std::vector<float> alone = model_->forward(seq, offsets, fresh_caches(storage, 1), LogitsFor::AllTokens);
    EXPECT_EQ(compare(alone, std::span(ragged).subspan(size_t(offsets_[b]) * vocab, alone.size())).max_abs, 0.0f)
        << "sequence " << b;
  }
}

TEST_P(TransformersFixture, DecodeThroughCacheEqualsFullForward) {
  // The longest sequence: prefill 5 tokens, then one token per step past every window.
  size_t longest = 0;
  for (size_t b = 0; b + 1 < offsets_.size(); ++b) {
    if (offsets_[b + 1] - offsets_[b] > offsets_[longest + 1] - offsets_[longest]) longest = b;
  }
  const auto seq = std::span(tokens_).subspan(size_t(offsets_[longest]),
                                              size_t(offsets_[longest + 1] - offsets_[longest]));
  const size_t vocab = size_t(model_->config().vocab_size);
  const std::vector<float> reference = read<float>(*ref_, "logits");
  const auto want = std::span(reference).subspan(size_t(offsets_[longest]) * vocab, seq.size() * vocab);
  std::vector<KvCache> storage;
  std::vector<KvCache*> cache = fresh_caches(storage, 1);
  std::vector<float> stepped;
  for (size_t pos = 0; pos < seq.size();) {
    const size_t len = pos == 0 ? std::min<size_t>(5, seq.size()) : 1;
    const int32_t offsets[] = {0, int32_t(len)};
    const std::vector<float> step = model_->forward(seq.subspan(pos, len), offsets, cache, LogitsFor::AllTokens);
    stepped.insert(stepped.end(), step.begin(), step.end());
    pos += len;
  }
  const Error e = compare(stepped, want);
  report("kv_cache_decode_logits", e);
  EXPECT_LE(e.relative(), kRelativeTolerance);
}

TEST_P(TransformersFixture, Greedy) {
  const std::vector<int32_t> prompt = read<int32_t>(*ref_, "greedy_prompt");
  const std::vector<int32_t> want_tokens = read<int32_t>(*ref_, "greedy_tokens");
  const std::vector<float> want_logits = read<float>(*ref_, "greedy_logits");
  const size_t vocab = size_t(model_->config().vocab_size);

  // Step by step through the cache, checking each step's logits.
  std::vector<KvCache> storage;
  std::vector<KvCache*> cache = fresh_caches(storage, 1);
  std::vector<int32_t> input = prompt;
  std::vector<float> logits;
  for (size_t i = 0; i < want_tokens.size(); ++i) {
    const int32_t offsets[] = {0, int32_t(input.size())};
    const std::vector<float> row = model_->forward(input, offsets, cache, LogitsFor::LastTokens);
    logits.insert(logits.end(), row.begin(), row.end());
    input = {int32_t(std::max_element(row.begin(), row.end()) - row.begin())};
  }
  const Error e = compare(logits, want_logits);
  report("greedy_logits", e);
  EXPECT_LE(e.relative(), kRelativeTolerance);

  // The generation loop itself, at temperature 0 with no stop tokens.
  GenerateOptions options;
  options.sampling.temperature = 0.0f;
  options.max_new_tokens = int(want_tokens.size());
  const std::vector<Generation> g = generate(*model_, {prompt}, options);
  ASSERT_EQ(g.size(), 1u);
  EXPECT_EQ(g[0].tokens, want_tokens);
  EXPECT_FALSE(g[0].stopped);
  for (size_t i = 0; i < g[0].logprobs.size() && i < want_tokens.size(); ++i) {
    const auto row = std::span(want_logits).subspan(i * vocab, vocab);
    const float max_logit = *std::max_element(row.begin(), row.end());
    double sum = 0;
    for (float x : row) sum += std::exp(double(x - max_logit));
    EXPECT_NEAR(g[0].logprobs[i], row[size_t(want_tokens[i])] - max_logit - std::log(sum), 1e-3) << "token " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, TransformersFixture, ::testing::ValuesIn(fixture_models()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           std::replace_if(name.begin(), name.end(), [](char c) { return !std::isalnum(c); }, '_');
                           return name;
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(TransformersFixture);

}  // namespace
}  // namespace ossrl
