// Shared by the GPU engine tests on the tiny fixtures: the CPU reference and the GPU model of
// one fixture, deterministic prompts, a small engine, and the CPU's view of a rollout.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "cuda/gpu_test.h"
#include "engine/cuda_engine.h"
#include "engine/cuda_model.h"
#include "engine/generate.h"
#include "engine/sampling.h"
#include "model/cpu_model.h"

namespace ossrl::test {

inline std::string fixture(const std::string& name) { return std::string(OSSRL_FIXTURE_DIR) + "/" + name; }

// Deterministic prompt tokens, all below the fixtures' special ids; each test file its own seed.
inline std::vector<int32_t> random_prompt(uint64_t seed, int length, uint64_t salt) {
  SamplingRng rng(seed, salt);
  std::vector<int32_t> p(static_cast<size_t>(length));
  for (int32_t& t : p) t = int32_t(rng.next() * 370);
  return p;
}

// A ragged batch of whole sequences for the log-prob checks, tokens and offsets: lengths 2, 17,
// 1, 40, 64, 5 (one token, page and prefill-chunk boundaries), prompt salts first_salt + length.
struct ScoredBatch {
  std::vector<int32_t> tokens, offsets{0};
};
inline ScoredBatch scored_batch(uint64_t seed, uint64_t first_salt) {
  ScoredBatch b;
  for (int length : {2, 17, 1, 40, 64, 5}) {
    const std::vector<int32_t> s = random_prompt(seed, length, first_salt + uint64_t(length));
    b.tokens.insert(b.tokens.end(), s.begin(), s.end());
    b.offsets.push_back(int32_t(b.tokens.size()));
  }
  return b;
}

// An engine sized for the fixtures' prompts: prompts longer than prefill_chunk are prefilled
// over several steps, beside decodes.
inline EngineOptions small_engine(int max_batch = 8) {
  EngineOptions o;
  o.max_batch = max_batch;
  o.prefill_chunk = 24;
  o.kv_pages = 128;
  o.max_sequence_length = 256;
  return o;
}

// The CPU's logits along a rollout g of `prompt` (with `adapters`, or the checkpoint alone):
// row k is the distribution g.tokens[k] was drawn from.
inline std::vector<float> cpu_logits_along(CpuModel& cpu, const std::vector<int32_t>& prompt, const Generation& g,
                                           std::span<const LayerAdapters* const> adapters = {}) {
  std::vector<int32_t> seq = prompt;
  if (!g.tokens.empty()) seq.insert(seq.end(), g.tokens.begin(), g.tokens.end() - 1);
  const int32_t offsets[] = {0, int32_t(seq.size())};
  KvCache cache = cpu.new_cache();
  KvCache* caches[] = {&cache};
  const std::vector<float> logits = cpu.forward(seq, offsets, caches, LogitsFor::AllTokens, adapters);
  const size_t vocab = size_t(cpu.config().vocab_size);
  return std::vector<float>(logits.begin() + std::ptrdiff_t((prompt.size() - 1) * vocab), logits.end());
}

// Where greedy rollouts fork between tokens a and b: how far the lower of the two sits below
// the top CPU logit, against the row's max |logit| (a near tie when gap <= tie * scale).
struct GreedyFork {
  double gap;
  float scale;
};
inline GreedyFork greedy_fork(std::span<const float> cpu_logits, int32_t a, int32_t b) {
  const float top = *std::max_element(cpu_logits.begin(), cpu_logits.end());
  float scale = 0;
  for (float x : cpu_logits) scale = std::max(scale, std::abs(x));
  return {top - std::min(cpu_logits[size_t(a)], cpu_logits[size_t(b)]), scale};
}

// One fixture (the test's parameter) as the CPU reference and as the GPU model.
class CpuAndCudaModels : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    OSSRL_REQUIRE_GPU();
    cpu_ = std::make_unique<CpuModel>(fixture(GetParam()));
    gpu_ = CudaModel::load(fixture(GetParam()));
  }
  std::unique_ptr<CpuModel> cpu_;
  std::unique_ptr<CudaModel> gpu_;
};

}  // namespace ossrl::test
