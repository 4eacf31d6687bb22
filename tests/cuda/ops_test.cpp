// The rollout engine's small kernels (embedding, rmsnorm, rope + KV write, router, expert
// grouping, sampling, log-probs) against the CPU reference ops, each over a table of odd
// shapes. Inputs the kernels read as bf16 are rounded to bf16 for the CPU too.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include "cuda/embedding.h"
#include "cuda/gpu_test.h"
#include "cuda/rmsnorm.h"
#include "cuda/rope.h"
#include "cuda/router.h"
#include "cuda/sampling.h"
#include "engine/sampling.h"
#include "model/config.h"
#include "model/cpu/linear.h"
#include "model/cpu/moe.h"
#include "model/cpu/rmsnorm.h"
#include "model/cpu/rope.h"
#include "model/rope.h"

namespace ossrl {
namespace {

using cuda::DeviceBuffer;
using test::bf16_ptr;
using test::expect_close;
using test::from_device_bf16;
using test::normal_vector;
using test::round_bf16;
using test::to_device_bf16;
using test::uniform_ints;

constexpr int kRowCounts[] = {1, 127, 128, 129, 1000};

TEST(CudaOps, EmbeddingGathersBf16Rows) {
  OSSRL_REQUIRE_GPU();
  const int vocab = 1000;
  for (int hidden : {64, 203, 2880}) {  // 203: the unvectorised path
    const std::vector<float> table = round_bf16(normal_vector(size_t(vocab) * hidden, 1));
    DeviceBuffer<uint16_t> table_d = to_device_bf16(table);
    for (int n : kRowCounts) {
      const std::string shape = "hidden " + std::to_string(hidden) + ", n " + std::to_string(n);
      std::vector<int32_t> tokens = uniform_ints(size_t(n), vocab, 2 + n);
      tokens[0] = vocab - 1;
      DeviceBuffer<int32_t> tokens_d(tokens);
      DeviceBuffer<float> out(size_t(n) * hidden);
      cuda::embedding_forward(out.data(), bf16_ptr(table_d), tokens_d.data(), n, hidden, nullptr);
      std::vector<float> want(out.size());
      for (int i = 0; i < n; ++i) {
        std::copy_n(table.begin() + int64_t(tokens[size_t(i)]) * hidden, hidden, want.begin() + int64_t(i) * hidden);
      }
      // Exact: bf16 widens to fp32 without rounding.
      expect_close(out.download(), want, [](size_t) { return 0.0; }, shape);
    }
  }
}

TEST(CudaOps, RmsNormMatchesCpu) {
  OSSRL_REQUIRE_GPU();
  const float eps = 1e-5f;
  for (int hidden : {64, 200, 203, 2880}) {  // 203: the unvectorised path
    const std::vector<float> weight = [&] {
      std::vector<float> w = normal_vector(size_t(hidden), 3, 0.3f);
      for (float& x : w) x += 1.0f;
      return w;
    }();
    DeviceBuffer<float> weight_d(weight);
    for (int n : kRowCounts) {
      std::vector<float> x = normal_vector(size_t(n) * hidden, 4 + n, 3.0f);
      for (int r = 0; r < n; ++r) {  // rows of different scales
        for (int j = 0; j < hidden; ++j) x[size_t(r) * hidden + j] *= 0.1f + float(r % 7);
      }
      std::vector<float> cpu(x.size());
      rmsnorm_forward(cpu.data(), nullptr, x.data(), weight.data(), n, hidden, eps);
      DeviceBuffer<float> x_d(x);
      for (bool gather : {false, true}) {
        const std::string shape =
            "hidden " + std::to_string(hidden) + ", n " + std::to_string(n) + (gather ? ", gathered rows" : "");
        // Gathered: every other row in a scrambled order, as the final norm picks last tokens.
        std::vector<int32_t> rows;
        for (int i = 0; i < (gather ? n / 2 + 1 : n); ++i) rows.push_back(gather ? int32_t((int64_t(i) * 7919) % n) : i);
        const int m = int(rows.size());
        DeviceBuffer<int32_t> rows_d(rows);
        DeviceBuffer<uint16_t> out(size_t(m) * hidden);
        cuda::rmsnorm_forward(bf16_ptr(out), x_d.data(), weight_d.data(), gather ? rows_d.data() : nullptr, m, hidden,
                              eps, nullptr);
        std::vector<float> want(size_t(m) * hidden);
        for (int i = 0; i < m; ++i) {
          std::copy_n(cpu.begin() + int64_t(rows[size_t(i)]) * hidden, hidden, want.begin() + int64_t(i) * hidden);
        }
        // bf16 output: rounding to nearest is within 2^-8 relative; the fp32 sum of squares,
        // summed in another order, moves the fp32 result by ~1e-6 relative.
        expect_close(from_device_bf16(out), want,
                     [&](size_t i) { return std::abs(want[i]) * (0x1p-8 + 1e-5) + 1e-30; }, shape);
      }
    }
  }
}

TEST(CudaOps, RopeRotatesQAndWritesKvCache) {
  OSSRL_REQUIRE_GPU();
  struct Shape {
    int n, heads, kv_heads, head_dim;
  };
  const Shape shapes[] = {{1, 64, 8, 64}, {127, 8, 2, 64}, {128, 4, 4, 64}, {129, 4, 1, 32}, {1000, 64, 8, 64}};
  const GptOssConfig config = GptOssConfig::gpt_oss_20b();  // YaRN factor 32
  for (const Shape& s : shapes) {
    const std::string shape = "n " + std::to_string(s.n) + ", heads " + std::to_string(s.heads) + "/" +
                              std::to_string(s.kv_heads) + ", head_dim " + std::to_string(s.head_dim);
    const RopeFrequencies freqs = rope_frequencies(config.rope, s.head_dim);
    const int half = s.head_dim / 2;
    const int q_width = s.heads * s.head_dim, kv_width = s.kv_heads * s.head_dim;
    const int width = q_width + 2 * kv_width;
    const std::vector<float> qkv = normal_vector(size_t(s.n) * width, 5 + s.n);
    // Positions up to 1e5 and the last one the config allows: angles of 1e5 radians.
    std::vector<int32_t> positions = uniform_ints(size_t(s.n), 100001, 6 + s.n);
    positions[0] = 100000;
    if (s.n > 1) positions[1] = config.max_position_embeddings - 1;
    if (s.n > 2) positions[2] = 0;
    // Distinct cache slots in a scrambled order; every fifth token is padding (-1).
    const int slots = s.n + 3;
    std::vector<int32_t> kv_slots(static_cast<size_t>(slots));
    std::iota(kv_slots.begin(), kv_slots.end(), 0);
    std::shuffle(kv_slots.begin(), kv_slots.end(), std::mt19937_64(7));
    kv_slots.resize(size_t(s.n));
    for (int i = 4; i < s.n; i += 5) kv_slots[size_t(i)] = -1;

    // CPU: rope_forward on each token's q and k heads at its own position.
    std::vector<float> want_q(size_t(s.n) * q_width);
    const float untouched = 99.0f;  // cache rows no token writes keep it
    std::vector<float> want_k(size_t(slots) * kv_width, untouched), want_v(want_k);
    for (int t = 0; t < s.n; ++t) {
      const float* row = qkv.data() + int64_t(t) * width;
      float* q = want_q.data() + int64_t(t) * q_width;
      std::copy_n(row, q_width, q);
      rope_forward(q, 1, s.heads, s.head_dim, positions[size_t(t)], freqs);
      const int slot = kv_slots[size_t(t)];
      if (slot < 0) continue;
      float* k = want_k.data() + int64_t(slot) * kv_width;
      std::copy_n(row + q_width, kv_width, k);
      rope_forward(k, 1, s.kv_heads, s.head_dim, positions[size_t(t)], freqs);
      std::copy_n(row + q_width + kv_width, kv_width, want_v.data() + int64_t(slot) * kv_width);
    }

    DeviceBuffer<float> qkv_d(qkv), q_out(want_q.size()), inv_freq_d(freqs.inv_freq);
    DeviceBuffer<int32_t> positions_d(positions), kv_slots_d(kv_slots);
    DeviceBuffer<uint16_t> k_cache = to_device_bf16(std::vector<float>(want_k.size(), untouched));
    DeviceBuffer<uint16_t> v_cache = to_device_bf16(std::vector<float>(want_v.size(), untouched));
    cuda::rope_qkv_forward(q_out.data(), bf16_ptr(k_cache), bf16_ptr(v_cache), qkv_d.data(), positions_d.data(),
                           kv_slots_d.data(), inv_freq_d.data(), freqs.attention_scaling, s.n, s.heads, s.kv_heads,
                           s.head_dim, nullptr);

    // Both sides rotate by cos/sin of the same fp32 angle; CUDA's sincosf is within 2 ulp of
    // glibc's (at any angle), and the GPU may fuse a multiply-add: about 2e-6 of the rotated
    // pair's norm (inputs are unit-scale), whichever element of the pair carries it.
    const auto pair_tolerance = [&](const std::vector<float>& want) {
      return [&want, half, head_dim = s.head_dim](size_t i) {
        const size_t j = i % size_t(head_dim), base = i - j;
        const size_t a = base + j % size_t(half);
        return 2e-6 * std::max(1.0, double(std::hypot(want[a], want[a + size_t(half)])));
      };
    };
    expect_close(q_out.download(), want_q, pair_tolerance(want_q), shape + ": q");
    // k is rounded to bf16 on top (2^-8 relative); v is copied, rounded to bf16 exactly as
    // round_bf16 does; rows of padding tokens are never written.
    const auto k_pair = pair_tolerance(want_k);
    expect_close(from_device_bf16(k_cache), want_k,
                 [&](size_t i) { return std::abs(want_k[i]) * 0x1p-8 + k_pair(i); }, shape + ": k cache");
    expect_close(from_device_bf16(v_cache), round_bf16(want_v), [](size_t) { return 0.0; }, shape + ": v cache");
  }
}

TEST(CudaOps, RouterTopKMatchesCpuWithTies) {
  OSSRL_REQUIRE_GPU();
  for (int experts : {32, 128, 256}) {
    // Logits and bias in steps of 1/8: their sums are exact on both sides, and many tie.
    const auto quantised = [](std::vector<float> v) {
      for (float& x : v) x = std::round(x * 8.0f) / 8.0f;
      return v;
    };
    const std::vector<float> bias = quantised(normal_vector(size_t(experts), 8));
    std::vector<float> identity(size_t(experts) * experts, 0.0f);
    for (int e = 0; e < experts; ++e) identity[size_t(e) * experts + e] = 1.0f;
    // The CPU router over x = logits with an identity matrix: its logits are x + bias exactly.
    MoeWeights weights;
    weights.router = fp32_matrix(identity.data(), experts, experts);
    weights.router_bias = bias;
    DeviceBuffer<float> bias_d(bias);
    for (int k : {1, 4, 8}) {
      for (int n : kRowCounts) {
        const std::string shape = "experts " + std::to_string(experts) + ", k " + std::to_string(k) + ", n " +
                                  std::to_string(n);
        const std::vector<float> logits = quantised(normal_vector(size_t(n) * experts, 9 + n, 2.0f));
        const MoeDims dims{experts, 1, experts, k, 7.0f};
        std::vector<float> cpu_logits(logits.size()), cpu_weight(size_t(n) * k);
        std::vector<int32_t> cpu_index(size_t(n) * k);
        router_forward(cpu_logits.data(), cpu_index.data(), cpu_weight.data(), logits.data(), n, weights, dims);
        for (size_t i = 0; i < logits.size(); ++i) {
          ASSERT_EQ(cpu_logits[i], logits[i] + bias[i % size_t(experts)]) << shape << ": the CPU oracle's logits";
        }

        DeviceBuffer<float> logits_d(logits), weight_d(cpu_weight.size());
        DeviceBuffer<int32_t> index_d(cpu_index.size());
        cuda::router_topk_forward(index_d.data(), weight_d.data(), logits_d.data(), bias_d.data(), n, experts, k,
                                  nullptr);
        // The same fp32 sums ranked by the same rule: identical choices, ties included.
        EXPECT_EQ(index_d.download(), cpu_index) << shape;
        // expf is within 2 ulp of glibc's exp; a softmax over <= 8 terms adds a few more.
        expect_close(weight_d.download(), cpu_weight, [](size_t) { return 1e-6; }, shape + ": weights");
      }
    }
  }
}

TEST(CudaOps, GroupByExpertIsAStableCountingSort) {
  OSSRL_REQUIRE_GPU();
  const int k = 4;
  for (int experts : {32, 128}) {
    for (int n : {0, 1, 127, 1000, 75000}) {  // 75000 tokens: a long prefill, 300k assignments
      const std::string shape = "experts " + std::to_string(experts) + ", n " + std::to_string(n);
      // Experts 3, 8, 13, ... get nothing: empty groups.
      std::vector<int32_t> index = uniform_ints(size_t(n) * k, experts, 10 + n);
      for (int32_t& e : index) {
        if (e % 5 == 3) e = (e + 1) % experts;
      }
      std::vector<int32_t> want_offsets(size_t(experts) + 1, 0), want_sorted;
      for (int32_t e : index) ++want_offsets[size_t(e) + 1];
      std::partial_sum(want_offsets.begin(), want_offsets.end(), want_offsets.begin());
      for (int e = 0; e < experts; ++e) {
        for (size_t a = 0; a < index.size(); ++a) {
          if (index[a] == e) want_sorted.push_back(int32_t(a));
        }
      }
      DeviceBuffer<int32_t> index_d(index), offsets_d(want_offsets.size()), sorted_d(index.size());
      cuda::moe_group_by_expert(offsets_d.data(), sorted_d.data(), index_d.data(), n, k, experts, nullptr);
      EXPECT_EQ(offsets_d.download(), want_offsets) << shape;
      EXPECT_EQ(sorted_d.download(), want_sorted) << shape;
    }
  }
}

// Realistic rows: a Gaussian tail under a few dominant tokens (tail mass ~1e-4 at T = 1), and
// in every fifth row some masked (-inf) tokens.
std::vector<float> lm_like_logits(int rows, int vocab, uint64_t seed) {
  std::vector<float> logits = normal_vector(size_t(rows) * vocab, seed);
  std::mt19937_64 rng(seed + 1);
  std::uniform_int_distribution<int> token(0, vocab - 1);
  std::uniform_real_distribution<float> boost(14.0f, 22.0f);
  for (int r = 0; r < rows; ++r) {
    float* row = logits.data() + int64_t(r) * vocab;
    for (int i = 0; i < 16; ++i) row[token(rng)] += boost(rng);
    if (r % 5 == 0) {
      for (int i = 0; i < 10; ++i) {
        float& x = row[token(rng)];
        if (x < 5.0f) x = -std::numeric_limits<float>::infinity();
      }
    }
  }
  return logits;
}

// Integer logits: large groups of equal probability, so top-k and top-p cut inside a group.
std::vector<float> tied_logits(int rows, int vocab, uint64_t seed) {
  std::vector<float> logits = normal_vector(size_t(rows) * vocab, seed, 1.5f);
  for (float& x : logits) x = std::round(x);
  return logits;
}

// log softmax(row)[token] in double: the reference for the fp32 log-probs. Not the CPU's
// token_logprob: it sums exp in fp32 in sequence, ~1e-3 off at 201088 similar terms.
double exact_logprob(std::span<const float> row, int32_t token) {
  const double max = *std::max_element(row.begin(), row.end());
  double sum = 0.0;
  for (float l : row) sum += std::exp(double(l) - max);
  return double(row[size_t(token)]) - max - std::log(sum);
}

// The GPU sums exp(logit - max) in fp32 over ~200 terms per lane, then in a tree: its log-prob
// is within ~1e-5 of the exact one.
constexpr double kLogprobTolerance = 2e-5;

// Samples every row on the GPU (row b with settings[b % size]) and on the CPU with the same
// random stream. The two sample from the same distribution, but the CPU sums it in fp32 in
// sequence (rounding of up to ~1e-5 over 201088 terms) where the GPU sums exactly, so a draw
// that falls within that distance of a token boundary may pick a neighbour: such mismatches
// are allowed, up to max_mismatches, only where the CPU's cumulative distribution puts u
// within 1e-4 of the GPU's token. Greedy rows must agree exactly.
void expect_samples_match(const std::vector<float>& logits, int rows, int vocab,
                          const std::vector<SamplingParams>& settings, int max_mismatches, const std::string& what) {
  std::vector<SamplingParams> params(static_cast<size_t>(rows));
  std::vector<SamplingRng> rngs;
  std::vector<uint64_t> keys(static_cast<size_t>(rows)), draws(static_cast<size_t>(rows));
  for (int b = 0; b < rows; ++b) {
    params[size_t(b)] = settings[size_t(b) % settings.size()];
    SamplingRng rng(2024, uint64_t(b));
    for (int i = 0; i < b % 3; ++i) rng.next();  // streams at different draws
    keys[size_t(b)] = rng.key();
    draws[size_t(b)] = rng.draws() + 1;
    rngs.push_back(rng);
  }
  DeviceBuffer<float> logits_d(logits), logprobs_d(static_cast<size_t>(rows));
  DeviceBuffer<SamplingParams> params_d(params);
  DeviceBuffer<uint64_t> keys_d(keys), draws_d(draws);
  DeviceBuffer<int32_t> tokens_d(static_cast<size_t>(rows));
  cuda::sample_tokens(tokens_d.data(), logprobs_d.data(), logits_d.data(), params_d.data(), keys_d.data(),
                      draws_d.data(), rows, vocab, nullptr);
  const std::vector<int32_t> tokens = tokens_d.download();
  const std::vector<float> logprobs = logprobs_d.download();

  int mismatches = 0;
  for (int b = 0; b < rows; ++b) {
    const std::span<const float> row(logits.data() + int64_t(b) * vocab, size_t(vocab));
    const SamplingParams& p = params[size_t(b)];
    const std::string where = what + ", row " + std::to_string(b) + " (T " + std::to_string(p.temperature) +
                              ", top_k " + std::to_string(p.top_k) + ", top_p " + std::to_string(p.top_p) +
                              ", min_p " + std::to_string(p.min_p) + ")";
    const double u = SamplingRng::uniform(keys[size_t(b)], draws[size_t(b)]);
    const SampledToken cpu = sample(row, p, rngs[size_t(b)]);
    const int32_t gpu = tokens[size_t(b)];
    ASSERT_TRUE(gpu >= 0 && gpu < vocab) << where << ": token " << gpu;
    EXPECT_NEAR(logprobs[size_t(b)], exact_logprob(row, gpu), kLogprobTolerance)
        << where << "; the CPU's token_logprob: " << token_logprob(row, gpu);
    if (gpu == cpu.token) continue;
    ++mismatches;
    EXPECT_NE(p.temperature, 0.0f) << where << ": greedy picked " << gpu << ", the CPU " << cpu.token;
    const std::vector<float> dist = sampling_distribution(row, p);
    double before = 0.0;
    for (int i = 0; i < gpu; ++i) before += dist[size_t(i)];
    const double after = before + dist[size_t(gpu)];
    EXPECT_TRUE(before - 1e-4 <= u && u < after + 1e-4)
        << where << ": u " << u << " picked " << gpu << " (CPU cumulative [" << before << ", " << after
        << ")), the CPU " << cpu.token;
  }
  EXPECT_LE(mismatches, max_mismatches) << what << ": tokens differing from the CPU's in " << rows << " rows";
  std::cout << what << ": " << mismatches << " of " << rows << " rows differ from the CPU's token\n";
}

TEST(CudaOps, SamplingMatchesCpu) {
  OSSRL_REQUIRE_GPU();
  const std::vector<SamplingParams> settings = {
      {1.0f, 0, 1.0f, 0.0f},     // the RL default: the full softmax
      {0.7f, 50, 1.0f, 0.0f},    // top-k
      {1.0f, 0, 0.9f, 0.0f},     // top-p
      {1.3f, 100, 0.8f, 0.05f},  // all three truncations
      {0.5f, 0, 1.0f, 0.1f},     // min-p
      {0.0f, 0, 1.0f, 0.0f},     // greedy
  };
  // At most one row in 200 may land on a neighbouring token (see expect_samples_match).
  expect_samples_match(lm_like_logits(1000, 1000, 11), 1000, 1000, settings, 5, "vocab 1000");
  expect_samples_match(lm_like_logits(200, 201088, 12), 200, 201088, settings, 1, "vocab 201088");
  expect_samples_match(lm_like_logits(1, 201088, 13), 1, 201088, settings, 0, "one row");
}

TEST(CudaOps, SamplingBreaksTiesByLowerId) {
  OSSRL_REQUIRE_GPU();
  // Top-k 37 and top-p end inside a group of equal probabilities, where the CPU keeps the
  // lowest ids; the part of the group kept holds 10-45% of the kept mass, so draws land in it
  // often and keeping other ids would show as unexplained mismatches.
  const SamplingParams top_k{1.0f, 37, 1.0f, 0.0f}, top_k_then_p{1.0f, 37, 0.6f, 0.0f}, top_p{1.0f, 0, 0.3f, 0.0f},
      min_p{0.5f, 0, 1.0f, 0.2f}, greedy{0.0f, 0, 1.0f, 0.0f};  // greedy: the lowest id of the top group
  expect_samples_match(tied_logits(500, 1000, 14), 500, 1000, {top_k, top_k_then_p, top_p, min_p, greedy}, 2,
                       "vocab 1000");
  // No top-p over the whole row here: the CPU sums the kept mass and the cumulative in fp32 in
  // rank order, and over 201088 tokens of equal small probability that is ~1e-3 off, enough to
  // move its cut by a few tokens of the group (and its distribution by ~6e-4) where the GPU's
  // sums are exact.
  expect_samples_match(tied_logits(60, 201088, 15), 60, 201088, {top_k, top_k_then_p, min_p, greedy}, 1,
                       "vocab 201088");
}

TEST(CudaOps, TokenLogprobsMatchLogSoftmax) {
  OSSRL_REQUIRE_GPU();
  for (int vocab : {1000, 201088}) {
    for (int rows : {1, 127, 129}) {
      const std::string shape = "vocab " + std::to_string(vocab) + ", rows " + std::to_string(rows);
      // Rows offset by up to 2000 (stability) with a few masked tokens.
      std::vector<float> logits = normal_vector(size_t(rows) * vocab, 16 + rows, 3.0f);
      const std::vector<int32_t> targets = uniform_ints(size_t(rows), vocab, 17 + rows);
      for (int r = 0; r < rows; ++r) {
        float* row = logits.data() + int64_t(r) * vocab;
        for (int i = 0; i < vocab; ++i) row[i] += 1000.0f * float(r % 3);
        for (int i = 0; i < 5; ++i) {
          const int masked = (targets[size_t(r)] + 1 + i * 7) % vocab;
          row[masked] = -std::numeric_limits<float>::infinity();
        }
      }
      DeviceBuffer<float> logits_d(logits), out(static_cast<size_t>(rows));
      DeviceBuffer<int32_t> targets_d(targets);
      cuda::token_logprobs(out.data(), logits_d.data(), targets_d.data(), rows, vocab, nullptr);
      std::vector<float> want(static_cast<size_t>(rows));
      float cpu_error = 0.0f;
      for (int r = 0; r < rows; ++r) {
        const std::span<const float> row(logits.data() + int64_t(r) * vocab, size_t(vocab));
        want[size_t(r)] = float(exact_logprob(row, targets[size_t(r)]));
        cpu_error = std::max(cpu_error, std::abs(token_logprob(row, targets[size_t(r)]) - want[size_t(r)]));
      }
      expect_close(out.download(), want, [](size_t) { return kLogprobTolerance; },
                   shape + " (the CPU's token_logprob is off by up to " + std::to_string(cpu_error) + ")");
    }
  }
}

}  // namespace
}  // namespace ossrl
