// Internal consistency of the CPU forward on random checkpoints: a ragged batch equals its
// sequences run alone, prefill + decode through the KV cache equals the full forward, the
// log-probs agree with the logits, both expert layouts give the same model, and bf16
// activations (model/cpu/activations.h) round where the GPU does while the default stays fp32.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/mxfp4.h"
#include "io/safetensors.h"
#include "model/cpu_model.h"
#include "model/tiny_model.h"

namespace ossrl {
namespace {

using testing::tiny_checkpoint;
using testing::tiny_config;

// A ragged batch of random tokens with the given lengths.
struct Batch {
  std::vector<int32_t> tokens;
  std::vector<int32_t> offsets{0};
};

Batch random_batch(const std::vector<int>& lengths, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Batch b;
  for (int len : lengths) {
    for (int i = 0; i < len; ++i) b.tokens.push_back(int32_t(rng() % uint64_t(vocab)));
    b.offsets.push_back(int32_t(b.tokens.size()));
  }
  return b;
}

// Logits of one whole sequence from an empty cache.
std::vector<float> full_logits(CpuModel& model, std::span<const int32_t> tokens) {
  KvCache cache = model.new_cache();
  KvCache* caches[] = {&cache};
  const int32_t offsets[] = {0, int32_t(tokens.size())};
  return model.forward(tokens, offsets, caches, LogitsFor::AllTokens);
}

float max_abs(const std::vector<float>& v) {
  float m = 0;
  for (float x : v) m = std::max(m, std::abs(x));
  return m;
}

float max_abs_diff(std::span<const float> a, std::span<const float> b) {
  EXPECT_EQ(a.size(), b.size());
  float m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

class CpuModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { dir_ = tiny_checkpoint("cpu_model_mxfp4", {.seed = 7}); }
  static inline std::string dir_;
};

TEST_F(CpuModelTest, LogitsAreFiniteAndOrderOne) {
  CpuModel model(dir_);
  const Batch b = random_batch({13}, model.config().vocab_size, 1);
  const std::vector<float> logits = full_logits(model, b.tokens);
  ASSERT_EQ(logits.size(), size_t(13 * model.config().vocab_size));
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
  EXPECT_GT(max_abs(logits), 0.3f);
  EXPECT_LT(max_abs(logits), 30.0f);
}

TEST_F(CpuModelTest, RaggedBatchEqualsEachSequenceAlone) {
  CpuModel model(dir_);
  const int vocab = model.config().vocab_size;
  const Batch b = random_batch({1, 5, 9, 13}, vocab, 2);
  std::vector<KvCache> caches(4, model.new_cache());
  std::vector<KvCache*> ptrs;
  for (KvCache& c : caches) ptrs.push_back(&c);
  const std::vector<float> ragged = model.forward(b.tokens, b.offsets, ptrs, LogitsFor::AllTokens);
  for (size_t s = 0; s + 1 < b.offsets.size(); ++s) {
    const auto tokens = std::span(b.tokens).subspan(size_t(b.offsets[s]), size_t(b.offsets[s + 1] - b.offsets[s]));
    const std::vector<float> alone = full_logits(model, tokens);
    const auto rows = std::span(ragged).subspan(size_t(b.offsets[s]) * size_t(vocab), alone.size());
    // Each row is computed by the same float operations in the same order: bit-identical.
    EXPECT_EQ(max_abs_diff(rows, alone), 0.0f) << "sequence " << s;
  }
}

TEST_F(CpuModelTest, PrefillThenDecodeEqualsFullForward) {
  CpuModel model(dir_);
  const int vocab = model.config().vocab_size;
  const Batch b = random_batch({17}, vocab, 3);
  const std::vector<float> full = full_logits(model, b.tokens);
  // Chunks: a prefill shorter than the window (4), one longer, then single-token decodes,
  // so the sliding layers' cache is trimmed between and inside chunks.
  const std::vector<int> chunks = {3, 6, 1, 1, 1, 1, 1, 1, 1, 1};
  KvCache cache = model.new_cache();
  KvCache* caches[] = {&cache};
  int pos = 0;
  for (int len : chunks) {
    const int32_t offsets[] = {0, len};
    const auto tokens = std::span(b.tokens).subspan(size_t(pos), size_t(len));
    const std::vector<float> step = model.forward(tokens, offsets, caches, LogitsFor::AllTokens);
    const auto want = std::span(full).subspan(size_t(pos) * size_t(vocab), step.size());
    EXPECT_EQ(max_abs_diff(step, want), 0.0f) << "chunk at position " << pos;
    pos += len;
  }
  EXPECT_EQ(cache.length(), 17);
  // The sliding layers kept only what the next query can see; the full layer everything.
  const int64_t row = int64_t(model.config().num_key_value_heads) * model.config().head_dim;
  EXPECT_EQ(int64_t(cache.layer(0).k.size()) / row, model.config().sliding_window - 1);
  EXPECT_EQ(cache.layer(0).first_position, 17 - (model.config().sliding_window - 1));
  EXPECT_EQ(int64_t(cache.layer(1).k.size()) / row, 17);
}

TEST_F(CpuModelTest, LastTokensAreTheLastRows) {
  CpuModel model(dir_);
  const int vocab = model.config().vocab_size;
  const Batch b = random_batch({2, 7, 4}, vocab, 4);
  std::vector<KvCache> caches(3, model.new_cache()), caches2(3, model.new_cache());
  std::vector<KvCache*> p, p2;
  for (int i = 0; i < 3; ++i) {
    p.push_back(&caches[size_t(i)]);
    p2.push_back(&caches2[size_t(i)]);
  }
  const std::vector<float> all = model.forward(b.tokens, b.offsets, p, LogitsFor::AllTokens);
  const std::vector<float> last = model.forward(b.tokens, b.offsets, p2, LogitsFor::LastTokens);
  ASSERT_EQ(last.size(), size_t(3 * vocab));
  for (size_t s = 0; s < 3; ++s) {
    const auto want = std::span(all).subspan(size_t(b.offsets[s + 1] - 1) * size_t(vocab), size_t(vocab));
    EXPECT_EQ(max_abs_diff(std::span(last).subspan(s * size_t(vocab), size_t(vocab)), want), 0.0f);
  }
}

TEST_F(CpuModelTest, LogProbsAreLogSoftmaxOfLogits) {
  CpuModel model(dir_);
  const int vocab = model.config().vocab_size;
  // 40 predicted rows: more than one lm_head chunk.
  const Batch b = random_batch({1, 20, 22}, vocab, 5);
  const std::vector<float> lp = model.log_probs(b.tokens, b.offsets);
  ASSERT_EQ(lp.size(), b.tokens.size());
  for (size_t s = 0; s + 1 < b.offsets.size(); ++s) {
    const auto tokens = std::span(b.tokens).subspan(size_t(b.offsets[s]), size_t(b.offsets[s + 1] - b.offsets[s]));
    const std::vector<float> logits = full_logits(model, tokens);
    EXPECT_EQ(lp[size_t(b.offsets[s])], 0.0f);
    for (size_t t = 1; t < tokens.size(); ++t) {
      const float* row = logits.data() + (t - 1) * size_t(vocab);
      double sum = 0;
      for (int i = 0; i < vocab; ++i) sum += std::exp(double(row[i]));
      EXPECT_NEAR(lp[size_t(b.offsets[s]) + t], row[tokens[t]] - std::log(sum), 1e-5);
    }
  }
}

TEST_F(CpuModelTest, RejectsMalformedBatches) {
  CpuModel model(dir_);
  KvCache cache = model.new_cache();
  KvCache* caches[] = {&cache};
  const std::vector<int32_t> tokens = {1, 2, 3};
  const int32_t wrong_end[] = {0, 2};
  EXPECT_THROW(model.forward(tokens, wrong_end, caches, LogitsFor::AllTokens), Error);
  const std::vector<int32_t> bad_token = {1, 100000};
  const int32_t offsets[] = {0, 2};
  EXPECT_THROW(model.forward(bad_token, offsets, caches, LogitsFor::AllTokens), Error);
}

// The MXFP4 checkpoint rewritten with dense fp32 experts in transformers' [in, out] layout
// (what save_pretrained writes after dequantising) is the same model.
TEST_F(CpuModelTest, DenseExpertLayoutMatchesMxfp4) {
  const std::string dense_dir = dir_ + ".dense";
  std::filesystem::create_directories(dense_dir);
  std::filesystem::copy_file(dir_ + "/config.json", dense_dir + "/config.json",
                             std::filesystem::copy_options::overwrite_existing);
  const Checkpoint src = Checkpoint::open(dir_);
  SafetensorsWriter writer;
  for (const std::string& name : src.names()) {
    const TensorView& t = src.tensor(name);
    if (name.ends_with("_scales")) continue;
    if (!name.ends_with("_blocks")) {
      writer.add(name, t.dtype, t.shape, std::span(t.data, t.nbytes));
      continue;
    }
    const std::string base = name.substr(0, name.size() - 7);  // ..._proj
    const TensorView& scales = src.tensor(base + "_scales");
    const int64_t experts = t.shape[0], out = t.shape[1], in = t.shape[2] * 32;
    std::vector<float> decoded(size_t(experts * out * in)), dense(decoded.size());
    mxfp4_decode_f32(t.data, scales.data, size_t(scales.numel()), decoded.data());
    for (int64_t e = 0; e < experts; ++e) {
      for (int64_t o = 0; o < out; ++o) {
        for (int64_t i = 0; i < in; ++i) dense[size_t((e * in + i) * out + o)] = decoded[size_t((e * out + o) * in + i)];
      }
    }
    writer.add_f32(base, {experts, in, out}, dense);
  }
  writer.write(dense_dir + "/model.safetensors");

  CpuModel mxfp4(dir_), dense(dense_dir);
  const Batch b = random_batch({11}, mxfp4.config().vocab_size, 6);
  const std::vector<float> a = full_logits(mxfp4, b.tokens);
  const std::vector<float> d = full_logits(dense, b.tokens);
  // The same products, summed in lanes by the row matmul and in sequence by the transposed
  // one: equal up to fp32 rounding.
  EXPECT_LE(max_abs_diff(a, d), 1e-5f * max_abs(a));
}

// Values of x that are not bf16 values.
size_t not_bf16(std::span<const float> x) {
  return size_t(std::count_if(x.begin(), x.end(), [](float v) { return bf16_to_f32(f32_to_bf16(v)) != v; }));
}

TEST(Activations, RoundToNearestEvenUnderBf16Only) {
  // 1 + 2^-8 and 1 + 3 * 2^-8 sit halfway between bf16 neighbours (spacing 2^-7 at 1): the
  // even one wins. 1 + 2^-8 + 2^-20 is past halfway.
  const std::vector<float> x = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-8f + 0x1p-20f, -2.5f, 0.0f};
  std::vector<float> y = x;
  round_activations(y.data(), int64_t(y.size()), Activations::Fp32);
  EXPECT_EQ(y, x);
  round_activations(y.data(), int64_t(y.size()), Activations::Bf16);
  EXPECT_EQ(y, (std::vector<float>{1.0f, 1.0f + 0x1p-6f, 1.0f + 0x1p-7f, -2.5f, 0.0f}));
}

// Activations::Bf16: the KV cache and lm_head's input hold bf16 values and the logits move by
// bf16 noise; Fp32, the default, rounds nothing. (That the default's numbers did not change
// with the option was checked bit for bit on the fixtures when it was added.)
TEST_F(CpuModelTest, Bf16ActivationsRoundWhereTheGpuDoes) {
  CpuModel fp32(dir_), bf16(dir_, Activations::Bf16);
  EXPECT_EQ(fp32.activations(), Activations::Fp32);
  const int vocab = fp32.config().vocab_size;
  const Batch b = random_batch({13}, vocab, 7);
  KvCache cache32 = fp32.new_cache(), cache16 = bf16.new_cache();
  KvCache* caches32[] = {&cache32};
  KvCache* caches16[] = {&cache16};
  const std::vector<float> logits32 = fp32.forward(b.tokens, b.offsets, caches32, LogitsFor::AllTokens);
  const std::vector<float> logits16 = bf16.forward(b.tokens, b.offsets, caches16, LogitsFor::AllTokens);
  for (int l = 0; l < fp32.config().num_hidden_layers; ++l) {
    const KvCache::Layer &c16 = cache16.layer(l), &c32 = cache32.layer(l);
    EXPECT_EQ(not_bf16(c16.k) + not_bf16(c16.v), 0u) << "layer " << l << ": k after RoPE and v, as the GPU caches them";
    EXPECT_GT(not_bf16(c32.k) + not_bf16(c32.v), c32.k.size()) << "layer " << l << ": the fp32 cache was rounded";
  }
  const std::vector<float> hidden16 = decoder_forward(bf16.ref(), b.tokens, b.offsets, {}, {}, nullptr);
  const std::vector<float> hidden32 = decoder_forward(fp32.ref(), b.tokens, b.offsets, {}, {}, nullptr);
  EXPECT_EQ(not_bf16(hidden16), 0u) << "lm_head's input";
  EXPECT_GT(not_bf16(hidden32), hidden32.size() / 2);

  // bf16 noise: a few 1e-3 of the largest logit on average, no more than a few % anywhere.
  double mean = 0;
  for (size_t i = 0; i < logits32.size(); ++i) mean += std::abs(logits32[i] - logits16[i]);
  mean /= double(logits32.size());
  const float scale = max_abs(logits32);
  EXPECT_GT(mean, 1e-5 * scale);
  EXPECT_LT(mean, 1e-2 * scale);
  EXPECT_LT(max_abs_diff(logits32, logits16), 0.05f * scale);
  std::cout << "[ bf16     ] mean |fp32 - bf16 logit| " << mean / scale << ", max "
            << max_abs_diff(logits32, logits16) / scale << " of max|logit| " << scale << "\n";

  // Backward recomputes fp32 activations: bf16 forwards keep none for it.
  DecoderActivations saved;
  EXPECT_THROW(decoder_forward(bf16.ref(), b.tokens, b.offsets, {}, {}, &saved), Error);
}

TEST(RandomCheckpoint, DeterministicInSeed) {
  const std::string a = tiny_checkpoint("seed_a", {.seed = 3, .mxfp4_experts = false, .dtype = DType::F32});
  const std::string b = tiny_checkpoint("seed_b", {.seed = 3, .mxfp4_experts = false, .dtype = DType::F32});
  const std::string c = tiny_checkpoint("seed_c", {.seed = 4, .mxfp4_experts = false, .dtype = DType::F32});
  auto bytes = [](const std::string& dir) {
    std::ifstream f(dir + "/model.safetensors", std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  EXPECT_EQ(bytes(a), bytes(b));
  EXPECT_NE(bytes(a), bytes(c));
  // And it loads, with the expected dense layout.
  CpuModel model(a);
  EXPECT_EQ(model.config().num_hidden_layers, tiny_config().num_hidden_layers);
}

}  // namespace
}  // namespace ossrl
