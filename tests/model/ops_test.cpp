// The CPU ops one by one, against hand-computed values and identities.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "io/mxfp4.h"
#include "model/cpu/attention.h"
#include "model/cpu/linear.h"
#include "model/cpu/moe.h"
#include "model/cpu/rmsnorm.h"
#include "model/cpu/rope.h"
#include "model/rope.h"

namespace ossrl {
namespace {

std::vector<float> random_vector(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

TEST(Attention, HandComputedSingleHead) {
  // One head of width 2, query at position 2 sees keys 0, 1, 2 and the sink.
  const std::vector<float> q = {1, 0};
  const std::vector<float> k = {1, 0, 0, 1, 2, 0};
  const std::vector<float> v = {1, 2, 3, 4, 5, 6};
  const float sink = 0.5f;
  AttentionDims d{1, 2, 3, 0, 1, 1, 2, 0};
  std::vector<float> out(2);
  float lse = 0;
  attention_forward(out.data(), &lse, q.data(), k.data(), v.data(), &sink, d);
  const double s[3] = {1 / std::sqrt(2.0), 0, 2 / std::sqrt(2.0)};
  const double denom = std::exp(0.5) + std::exp(s[0]) + std::exp(s[1]) + std::exp(s[2]);
  double want0 = 0, want1 = 0;
  for (int j = 0; j < 3; ++j) {
    want0 += std::exp(s[j]) / denom * v[size_t(2 * j)];
    want1 += std::exp(s[j]) / denom * v[size_t(2 * j + 1)];
  }
  EXPECT_NEAR(out[0], want0, 1e-6);  // 2.91176
  EXPECT_NEAR(out[1], want1, 1e-6);  // 3.72420
  EXPECT_NEAR(lse, std::log(denom), 1e-6);
}

TEST(Attention, SinkScalesByLogSumExpSigmoid) {
  // out(sink) = softmax(scores)·V · sigmoid(LSE(scores) - sink), per query and head.
  const int heads = 4, kv_heads = 2, dim = 8, n = 6;
  const auto q = random_vector(size_t(n * heads * dim), 1, 2.0f);
  const auto k = random_vector(size_t(n * kv_heads * dim), 2, 2.0f);
  const auto v = random_vector(size_t(n * kv_heads * dim), 3);
  const std::vector<float> no_sink(heads, -1e30f);
  const std::vector<float> sinks = {-1.0f, 0.0f, 0.7f, 3.0f};
  AttentionDims d{n, 0, n, 0, heads, kv_heads, dim, 0};
  std::vector<float> plain(q.size()), with_sink(q.size()), lse_plain(size_t(n * heads)),
      lse_sink(size_t(n * heads));
  attention_forward(plain.data(), lse_plain.data(), q.data(), k.data(), v.data(), no_sink.data(), d);
  attention_forward(with_sink.data(), lse_sink.data(), q.data(), k.data(), v.data(), sinks.data(), d);
  for (int t = 0; t < n; ++t) {
    for (int h = 0; h < heads; ++h) {
      const float l = lse_plain[size_t(t * heads + h)];
      const float gate = 1.0f / (1.0f + std::exp(-(l - sinks[size_t(h)])));
      EXPECT_NEAR(lse_sink[size_t(t * heads + h)], std::log(std::exp(l) + std::exp(sinks[size_t(h)])), 1e-5);
      for (int i = 0; i < dim; ++i) {
        const size_t at = size_t((t * heads + h) * dim + i);
        EXPECT_NEAR(with_sink[at], plain[at] * gate, 1e-6);
      }
    }
  }
}

TEST(Attention, GroupedHeadsReadTheirKvHead) {
  // Query heads 0,1 read kv head 0 and heads 2,3 read kv head 1: same as single-head calls.
  const int heads = 4, kv_heads = 2, dim = 8, n = 5;
  const auto q = random_vector(size_t(n * heads * dim), 4);
  const auto k = random_vector(size_t(n * kv_heads * dim), 5);
  const auto v = random_vector(size_t(n * kv_heads * dim), 6);
  const std::vector<float> sinks = {0.1f, -0.2f, 0.3f, 0.0f};
  std::vector<float> out(q.size());
  attention_forward(out.data(), nullptr, q.data(), k.data(), v.data(), sinks.data(),
                    AttentionDims{n, 0, n, 0, heads, kv_heads, dim, 0});
  for (int h = 0; h < heads; ++h) {
    const int g = h / 2;
    std::vector<float> qh, kg, vg, oh(size_t(n * dim));
    for (int t = 0; t < n; ++t) {
      qh.insert(qh.end(), q.begin() + (t * heads + h) * dim, q.begin() + (t * heads + h + 1) * dim);
      kg.insert(kg.end(), k.begin() + (t * kv_heads + g) * dim, k.begin() + (t * kv_heads + g + 1) * dim);
      vg.insert(vg.end(), v.begin() + (t * kv_heads + g) * dim, v.begin() + (t * kv_heads + g + 1) * dim);
    }
    attention_forward(oh.data(), nullptr, qh.data(), kg.data(), vg.data(), &sinks[size_t(h)],
                      AttentionDims{n, 0, n, 0, 1, 1, dim, 0});
    for (int t = 0; t < n; ++t) {
      for (int i = 0; i < dim; ++i) {
        EXPECT_EQ(out[size_t((t * heads + h) * dim + i)], oh[size_t(t * dim + i)]);
      }
    }
  }
}

TEST(Attention, SlidingWindowCountsPositions) {
  // Window 3: the query at position 6 sees positions 4, 5, 6 only. Keys held from position 4
  // (a trimmed cache) give the same output as keys from 0, and older keys do not matter.
  const int dim = 4, n_keys = 7;
  const auto q = random_vector(size_t(dim), 7);
  auto k = random_vector(size_t(n_keys * dim), 8);
  const auto v = random_vector(size_t(n_keys * dim), 9);
  const float sink = 0.2f;
  std::vector<float> full(dim), trimmed(dim), perturbed(dim);
  attention_forward(full.data(), nullptr, q.data(), k.data(), v.data(), &sink,
                    AttentionDims{1, 6, n_keys, 0, 1, 1, dim, 3});
  attention_forward(trimmed.data(), nullptr, q.data(), k.data() + 4 * dim, v.data() + 4 * dim, &sink,
                    AttentionDims{1, 6, 3, 4, 1, 1, dim, 3});
  for (int i = 0; i < 4 * dim; ++i) k[size_t(i)] = 100.0f;
  attention_forward(perturbed.data(), nullptr, q.data(), k.data(), v.data(), &sink,
                    AttentionDims{1, 6, n_keys, 0, 1, 1, dim, 3});
  for (int i = 0; i < dim; ++i) {
    EXPECT_EQ(full[size_t(i)], trimmed[size_t(i)]);
    EXPECT_EQ(full[size_t(i)], perturbed[size_t(i)]);
  }
}

TEST(Attention, RejectsKeysThatDoNotCoverTheWindow) {
  const std::vector<float> q(4), k(8), v(8);
  const float sink = 0;
  std::vector<float> out(4);
  // Window 3 at position 6 needs positions 4..6; keys start at 5.
  EXPECT_THROW(attention_forward(out.data(), nullptr, q.data(), k.data(), v.data(), &sink,
                                 AttentionDims{1, 6, 2, 5, 1, 1, 4, 3}),
               std::exception);
}

TEST(Rope, YarnFrequenciesOfGptOss) {
  const RopeFrequencies f = rope_frequencies(RopeConfig{}, 64);
  ASSERT_EQ(f.inv_freq.size(), 32u);
  EXPECT_NEAR(f.attention_scaling, 0.1 * std::log(32.0) + 1.0, 1e-7);  // 1.34657
  // low = 8.09, high = 17.40 (truncate false): below low pure extrapolation 1/theta^(2j/d),
  // above high pure interpolation, in between a linear blend.
  for (int j = 0; j < 32; ++j) {
    const double extrapolation = 1.0 / std::pow(150000.0, 2.0 * j / 64);
    const double interpolation = extrapolation / 32;
    const double low = 64 * std::log(4096 / (32 * 2 * M_PI)) / (2 * std::log(150000.0));
    const double high = 64 * std::log(4096 / (1 * 2 * M_PI)) / (2 * std::log(150000.0));
    const double ramp = std::clamp((j - low) / (high - low), 0.0, 1.0);
    const double want = interpolation * ramp + extrapolation * (1 - ramp);
    EXPECT_NEAR(f.inv_freq[size_t(j)], want, 2e-6 * want) << "j = " << j;
  }
  EXPECT_EQ(f.inv_freq[0], 1.0f);
}

TEST(Rope, FactorOneIsPlainRope) {
  RopeConfig plain;
  plain.factor = 1.0;
  const RopeFrequencies f = rope_frequencies(plain, 16);
  EXPECT_EQ(f.attention_scaling, 1.0f);
  for (int j = 0; j < 8; ++j) EXPECT_NEAR(f.inv_freq[size_t(j)], 1.0 / std::pow(150000.0, j / 8.0), 1e-7);
}

TEST(Rope, RotatesHalvesByPositionAngle) {
  const RopeFrequencies f = rope_frequencies(RopeConfig{}, 8);
  const auto x = random_vector(2 * 3 * 8, 10);  // 2 tokens, 3 heads
  auto y = x;
  rope_forward(y.data(), 2, 3, 8, 5, f);
  for (int t = 0; t < 2; ++t) {
    for (int h = 0; h < 3; ++h) {
      for (int j = 0; j < 4; ++j) {
        const size_t base = size_t((t * 3 + h) * 8);
        const double angle = double(float(5 + t) * f.inv_freq[size_t(j)]);
        const double c = std::cos(angle) * f.attention_scaling, s = std::sin(angle) * f.attention_scaling;
        EXPECT_NEAR(y[base + j], x[base + j] * c - x[base + j + 4] * s, 1e-5);
        EXPECT_NEAR(y[base + j + 4], x[base + j + 4] * c + x[base + j] * s, 1e-5);
      }
    }
  }
}

TEST(RmsNorm, MatchesDefinition) {
  const auto x = random_vector(3 * 10, 11, 3.0f);
  const auto w = random_vector(10, 12);
  std::vector<float> y(x.size()), rstd(3);
  rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), 3, 10, 1e-5f);
  for (int t = 0; t < 3; ++t) {
    double ms = 0;
    for (int i = 0; i < 10; ++i) ms += double(x[size_t(t * 10 + i)]) * x[size_t(t * 10 + i)] / 10;
    EXPECT_NEAR(rstd[size_t(t)], 1 / std::sqrt(ms + 1e-5), 1e-5);
    for (int i = 0; i < 10; ++i) {
      EXPECT_NEAR(y[size_t(t * 10 + i)], x[size_t(t * 10 + i)] / std::sqrt(ms + 1e-5) * w[size_t(i)], 1e-5);
    }
  }
}

// A [out, in] matrix in each supported encoding gives the product with its decoded values.
TEST(Linear, EveryEncodingAndLayout) {
  const int64_t out = 5, in = 64, n = 3;
  // MXFP4 codes and scales, decoded once as the reference values.
  std::mt19937_64 rng(13);
  std::vector<uint8_t> blocks(size_t(out * in / 2)), scales(size_t(out * in / 32));
  for (uint8_t& b : blocks) b = uint8_t(rng());
  for (uint8_t& s : scales) s = uint8_t(120 + rng() % 6);
  std::vector<float> w(size_t(out * in));
  mxfp4_decode_f32(blocks.data(), scales.data(), scales.size(), w.data());
  // The same values as f32 [out, in], bf16 [out, in] (exact: at most two significant
  // bits) and f32 transposed [in, out].
  std::vector<uint16_t> w_bf16(w.size());
  std::vector<float> w_t(w.size());
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) {
      w_bf16[size_t(o * in + i)] = f32_to_bf16(w[size_t(o * in + i)]);
      w_t[size_t(i * out + o)] = w[size_t(o * in + i)];
    }
  }
  const auto x = random_vector(size_t(n * in), 14);
  const auto bias = random_vector(size_t(out), 15);
  const auto bytes = [](const auto& v) { return reinterpret_cast<const uint8_t*>(v.data()); };
  const WeightMatrix matrices[] = {
      {WeightFormat::F32, out, in, false, bytes(w), nullptr},
      {WeightFormat::BF16, out, in, false, bytes(w_bf16), nullptr},
      {WeightFormat::MXFP4, out, in, false, blocks.data(), scales.data()},
      {WeightFormat::F32, out, in, true, bytes(w_t), nullptr},
  };
  for (const WeightMatrix& m : matrices) {
    std::vector<float> y(size_t(n * out));
    linear_forward(y.data(), x.data(), m, bias.data(), n);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t o = 0; o < out; ++o) {
        double want = bias[size_t(o)];
        for (int64_t i = 0; i < in; ++i) want += double(x[size_t(t * in + i)]) * w[size_t(o * in + i)];
        EXPECT_NEAR(y[size_t(t * out + o)], want, 1e-4 * (1 + std::abs(want)));
      }
    }
  }
}

TEST(Linear, EmbeddingRejectsOutOfRangeTokens) {
  const std::vector<float> table(4 * 2, 1.0f);
  const WeightMatrix m{WeightFormat::F32, 4, 2, false, reinterpret_cast<const uint8_t*>(table.data()), nullptr};
  std::vector<float> out(2);
  const int32_t bad = 4;
  EXPECT_THROW(embedding_forward(out.data(), &bad, 1, m), std::exception);
}

TEST(Moe, RouterTopKThenSoftmaxLowestIndexOnTies) {
  // Router = identity on a 4-wide input, so router logits are the input itself.
  const std::vector<float> eye = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
  MoeWeights w;
  w.router = WeightMatrix{WeightFormat::F32, 4, 4, false, reinterpret_cast<const uint8_t*>(eye.data()), nullptr};
  w.router_bias = {0, 0, 0, 0};
  const MoeDims d{4, 4, 4, 2, 7.0f};
  const std::vector<float> x = {0.5f, 2.0f, 0.5f, 1.0f,   // distinct top two: 1, 3
                                1.0f, 0.0f, 1.0f, 1.0f};  // three-way tie: 0, 2
  std::vector<float> logits(8), weight(4);
  std::vector<int32_t> index(4);
  router_forward(logits.data(), index.data(), weight.data(), x.data(), 2, w, d);
  EXPECT_EQ(index, (std::vector<int32_t>{1, 3, 0, 2}));
  EXPECT_NEAR(weight[0], 1 / (1 + std::exp(-1.0)), 1e-6);
  EXPECT_NEAR(weight[1], 1 / (1 + std::exp(1.0)), 1e-6);
  EXPECT_NEAR(weight[2], 0.5, 1e-7);
  EXPECT_NEAR(weight[3], 0.5, 1e-7);
}

TEST(Moe, ClampedSwiglu) {
  // Interleaved (gate, up) pairs: clamps bite on gate above 7 and up outside [-7, 7].
  const std::vector<float> gate_up = {10.0f, -9.0f, -3.0f, 2.0f, 1.0f, 8.0f};
  std::vector<float> h(3);
  swiglu_forward(h.data(), gate_up.data(), 1, 3, 7.0f);
  auto glu = [](double g) { return g / (1 + std::exp(-1.702 * g)); };
  EXPECT_NEAR(h[0], (-7 + 1) * glu(7), 1e-5);
  EXPECT_NEAR(h[1], (2 + 1) * glu(-3), 1e-6);
  EXPECT_NEAR(h[2], (7 + 1) * glu(1), 1e-6);
}

}  // namespace
}  // namespace ossrl
