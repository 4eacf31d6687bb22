// The backward of every CPU op against central differences of its forward (grad_check.h):
// loss = Σ w·output with fixed random w, each input perturbed in turn. Tolerances are
// norm-wise relative errors per tensor: 2e-3 for the nonlinear ops (observed at most 6e-4,
// the MoE; 3e-4 lm_head; ≤ 1e-4 the rest), 1e-4 for LoRA and 1e-5 for the linear maps
// (observed ~1e-5). OSSRL_GRAD_VERBOSE=1 prints every error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "io/mxfp4.h"
#include "model/cpu/attention.h"
#include "model/cpu/linear.h"
#include "model/cpu/lm_head.h"
#include "model/cpu/lora.h"
#include "model/cpu/moe.h"
#include "model/cpu/rmsnorm.h"
#include "model/cpu/rope.h"
#include "model/grad_check.h"
#include "model/rope.h"

namespace ossrl {
namespace {

using testing::expect_grad;
using testing::numeric_grad;
using testing::random_floats;
using testing::weighted_sum;

constexpr float kEps = 1e-2f;
constexpr double kTol = 2e-3;

const uint8_t* bytes(const std::vector<float>& v) { return reinterpret_cast<const uint8_t*>(v.data()); }

// A matrix [out, in] in one encoding, with its decoded values for reference.
struct TestMatrix {
  std::vector<float> values;  // [out, in] decoded
  std::vector<float> f32;     // storage when F32 (maybe transposed)
  std::vector<uint16_t> bf16;
  std::vector<uint8_t> blocks, scales;
  WeightMatrix view;
};

TestMatrix make_matrix(WeightFormat format, bool transposed, int64_t out, int64_t in, uint64_t seed) {
  TestMatrix m;
  std::mt19937_64 rng(seed);
  m.blocks.resize(size_t(out * in / 2));
  m.scales.resize(size_t(out * in / 32));
  for (uint8_t& b : m.blocks) b = uint8_t(rng());
  for (uint8_t& s : m.scales) s = uint8_t(122 + rng() % 4);
  m.values.resize(size_t(out * in));
  mxfp4_decode_f32(m.blocks.data(), m.scales.data(), m.scales.size(), m.values.data());
  switch (format) {
    case WeightFormat::MXFP4:
      m.view = {format, out, in, false, m.blocks.data(), m.scales.data()};
      break;
    case WeightFormat::BF16:
      for (float v : m.values) m.bf16.push_back(f32_to_bf16(v));  // exact: few significant bits
      m.view = {format, out, in, false, reinterpret_cast<const uint8_t*>(m.bf16.data()), nullptr};
      break;
    case WeightFormat::F32:
      m.f32.resize(m.values.size());
      for (int64_t o = 0; o < out; ++o) {
        for (int64_t i = 0; i < in; ++i) {
          m.f32[size_t(transposed ? i * out + o : o * in + i)] = m.values[size_t(o * in + i)];
        }
      }
      m.view = {format, out, in, transposed, bytes(m.f32), nullptr};
      break;
  }
  return m;
}

// dx = dy · W through every encoding and layout, across the 256-column strips.
TEST(LinearBackward, InputGradientEveryEncodingAndLayout) {
  struct Case {
    WeightFormat format;
    bool transposed;
    int64_t n, out, in;
  };
  const Case cases[] = {{WeightFormat::F32, false, 3, 5, 64},    {WeightFormat::BF16, false, 1, 7, 288},
                        {WeightFormat::MXFP4, false, 4, 3, 320}, {WeightFormat::F32, true, 2, 300, 32},
                        {WeightFormat::MXFP4, false, 2, 600, 32}};
  for (const Case& c : cases) {
    const TestMatrix m = make_matrix(c.format, c.transposed, c.out, c.in, 5);
    const auto dy = random_floats(size_t(c.n * c.out), 6);
    std::vector<float> dx(size_t(c.n * c.in), 1.0f);  // accumulates onto 1
    linear_backward_input(dx.data(), dy.data(), m.view, c.n);
    for (int64_t t = 0; t < c.n; ++t) {
      for (int64_t i = 0; i < c.in; ++i) {
        double want = 1.0;
        for (int64_t o = 0; o < c.out; ++o) want += double(dy[size_t(t * c.out + o)]) * m.values[size_t(o * c.in + i)];
        ASSERT_NEAR(dx[size_t(t * c.in + i)], want, 1e-5 * (1 + std::abs(want)))
            << "format " << int(c.format) << " transposed " << c.transposed << " t " << t << " i " << i;
      }
    }
  }
}

TEST(LinearBackward, WeightAndBiasGradientsMatchFiniteDifferences) {
  const int64_t n = 3, out = 5, in = 7;
  auto w = random_floats(size_t(out * in), 1);
  auto b = random_floats(size_t(out), 2);
  auto x = random_floats(size_t(n * in), 3);
  const auto wy = random_floats(size_t(n * out), 4);
  std::vector<float> y(size_t(n * out));
  auto loss = [&] {
    linear_forward(y.data(), x.data(), fp32_matrix(w.data(), out, in), b.data(), n);
    return weighted_sum(y.data(), wy);
  };
  std::vector<float> dw(w.size(), 0.0f), db(b.size(), 0.0f), dx(x.size(), 0.0f);
  linear_backward_weight(dw.data(), db.data(), wy.data(), x.data(), n, out, in);
  linear_backward_input(dx.data(), wy.data(), fp32_matrix(w.data(), out, in), n);
  expect_grad("linear dW", dw.data(), numeric_grad(w.data(), w.size(), loss, kEps), 1e-5);
  expect_grad("linear db", db.data(), numeric_grad(b.data(), b.size(), loss, kEps), 1e-5);
  expect_grad("linear dx", dx.data(), numeric_grad(x.data(), x.size(), loss, kEps), 1e-5);
}

TEST(LinearBackward, WeightRowsViewAChunkOfEveryEncoding) {
  for (WeightFormat f : {WeightFormat::F32, WeightFormat::BF16, WeightFormat::MXFP4}) {
    const TestMatrix m = make_matrix(f, false, 9, 64, 8);
    const WeightMatrix chunk = weight_rows(m.view, 3, 7);
    std::vector<float> row(64);
    for (int64_t o = 0; o < 4; ++o) {
      chunk.decode_row(o, row.data());
      for (int64_t i = 0; i < 64; ++i) ASSERT_EQ(row[size_t(i)], m.values[size_t((o + 3) * 64 + i)]);
    }
  }
}

TEST(EmbeddingBackward, ScattersAndAddsRepeatedTokens) {
  const int64_t hidden = 3;
  const std::vector<int32_t> tokens = {2, 0, 2};
  const auto dout = random_floats(size_t(3 * hidden), 9);
  std::vector<float> dtable(size_t(4 * hidden), 0.0f);
  embedding_backward(dtable.data(), dout.data(), tokens.data(), 3, hidden);
  for (int64_t i = 0; i < hidden; ++i) {
    EXPECT_FLOAT_EQ(dtable[size_t(0 * hidden + i)], dout[size_t(1 * hidden + i)]);
    EXPECT_FLOAT_EQ(dtable[size_t(2 * hidden + i)], dout[size_t(i)] + dout[size_t(2 * hidden + i)]);
    EXPECT_EQ(dtable[size_t(1 * hidden + i)], 0.0f);
    EXPECT_EQ(dtable[size_t(3 * hidden + i)], 0.0f);
  }
}

TEST(RmsNormBackward, MatchesFiniteDifferences) {
  const int64_t n = 3, dim = 10;
  auto x = random_floats(size_t(n * dim), 11, -2.0f, 2.0f);
  auto w = random_floats(size_t(dim), 12);
  const auto wy = random_floats(size_t(n * dim), 13);
  std::vector<float> y(x.size()), rstd(static_cast<size_t>(n));
  auto loss = [&] {
    rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), n, dim, 1e-5f);
    return weighted_sum(y.data(), wy);
  };
  loss();
  std::vector<float> dx(x.size(), 0.0f), dw(w.size(), 0.0f);
  rmsnorm_backward(dx.data(), dw.data(), wy.data(), x.data(), w.data(), rstd.data(), n, dim);
  expect_grad("rmsnorm dx", dx.data(), numeric_grad(x.data(), x.size(), loss, kEps), kTol);
  expect_grad("rmsnorm dweight", dw.data(), numeric_grad(w.data(), w.size(), loss, kEps), kTol);
}

TEST(RopeBackward, IsTheTransposeOfTheForward) {
  // YaRN-scaled frequencies: cos and sin carry attention_scaling, so the map is a scaled
  // rotation and its backward the transpose, not the inverse.
  RopeConfig rc;
  rc.theta = 150000;
  rc.factor = 32;
  rc.original_max_position_embeddings = 64;
  const RopeFrequencies f = rope_frequencies(rc, 8);
  ASSERT_GT(f.attention_scaling, 1.0f);
  const int64_t n = 4;
  const int heads = 3;
  auto x = random_floats(size_t(n * heads * 8), 14);
  const auto wy = random_floats(x.size(), 15);
  std::vector<float> y(x.size());
  auto loss = [&] {
    y = x;
    rope_forward(y.data(), n, heads, 8, 5, f);
    return weighted_sum(y.data(), wy);
  };
  std::vector<float> dx = wy;
  rope_backward(dx.data(), n, heads, 8, 5, f);
  expect_grad("rope dx", dx.data(), numeric_grad(x.data(), x.size(), loss, kEps), 1e-5);
}

struct AttentionCase {
  int64_t n_queries, first_query_position, n_keys, first_key_position;
  int heads, kv_heads, head_dim, window;
};

class AttentionBackward : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionBackward, MatchesFiniteDifferences) {
  const AttentionCase c = GetParam();
  const AttentionDims d{c.n_queries, c.first_query_position, c.n_keys, c.first_key_position,
                        c.heads,     c.kv_heads,             c.head_dim, c.window};
  auto q = random_floats(size_t(c.n_queries * c.heads * c.head_dim), 21, -1.5f, 1.5f);
  auto k = random_floats(size_t(c.n_keys * c.kv_heads * c.head_dim), 22, -1.5f, 1.5f);
  auto v = random_floats(size_t(c.n_keys * c.kv_heads * c.head_dim), 23);
  auto sinks = random_floats(size_t(c.heads), 24);
  const auto wy = random_floats(q.size(), 25);
  std::vector<float> out(q.size()), lse(size_t(c.n_queries * c.heads));
  auto loss = [&] {
    attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), sinks.data(), d);
    return weighted_sum(out.data(), wy);
  };
  loss();
  std::vector<float> dq(q.size(), 0.0f), dk(k.size(), 0.0f), dv(v.size(), 0.0f), ds(sinks.size(), 0.0f);
  attention_backward(dq.data(), dk.data(), dv.data(), ds.data(), wy.data(), q.data(), k.data(), v.data(),
                     sinks.data(), out.data(), lse.data(), d);
  expect_grad("attention dq", dq.data(), numeric_grad(q.data(), q.size(), loss, kEps), kTol);
  expect_grad("attention dk", dk.data(), numeric_grad(k.data(), k.size(), loss, kEps), kTol);
  expect_grad("attention dv", dv.data(), numeric_grad(v.data(), v.size(), loss, kEps), kTol);
  expect_grad("attention dsinks", ds.data(), numeric_grad(sinks.data(), sinks.size(), loss, kEps), kTol);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionBackward,
    ::testing::Values(AttentionCase{7, 0, 7, 0, 4, 2, 8, 0},    // full causal, GQA groups of 2
                      AttentionCase{7, 0, 7, 0, 4, 2, 8, 3},    // sliding window shorter than the sequence
                      AttentionCase{3, 5, 6, 2, 2, 1, 4, 4},    // queries after cached keys (MQA)
                      AttentionCase{1, 0, 1, 0, 3, 3, 5, 0}));  // one token: only itself and the sink

TEST(RouterBackward, SoftmaxOverChosenMatchesFiniteDifferences) {
  // Router = identity with spaced biases, so the top-k choice is stable under ±eps.
  const int experts = 5, k = 3;
  const int64_t n = 4;
  std::vector<float> eye(size_t(experts * experts), 0.0f);
  for (int e = 0; e < experts; ++e) eye[size_t(e * experts + e)] = 1.0f;
  MoeWeights w;
  w.router = fp32_matrix(eye.data(), experts, experts);
  w.router_bias = {0.0f, 0.9f, -0.7f, 1.6f, 0.3f};
  const MoeDims d{experts, 8, experts, k, 7.0f};
  auto x = random_floats(size_t(n * experts), 31, -0.2f, 0.2f);
  const auto wy = random_floats(size_t(n * k), 32);
  std::vector<float> logits(size_t(n * experts)), weight(size_t(n * k));
  std::vector<int32_t> index(size_t(n * k)), first_index;
  auto loss = [&] {
    router_forward(logits.data(), index.data(), weight.data(), x.data(), n, w, d);
    EXPECT_TRUE(first_index.empty() || index == first_index) << "the choice moved";
    return weighted_sum(weight.data(), wy);
  };
  loss();
  first_index = index;
  std::vector<float> dlogits(size_t(n * experts)), dx(x.size(), 0.0f);
  router_softmax_backward(dlogits.data(), wy.data(), index.data(), weight.data(), n, d);
  linear_backward_input(dx.data(), dlogits.data(), w.router, n);
  expect_grad("router dx", dx.data(), numeric_grad(x.data(), x.size(), loss, 1e-3f), kTol);
  for (int64_t t = 0; t < n; ++t) {  // experts not chosen get exactly nothing
    for (int e = 0; e < experts; ++e) {
      bool chosen = false;
      for (int i = 0; i < k; ++i) chosen |= index[size_t(t * k + i)] == e;
      if (!chosen) EXPECT_EQ(dlogits[size_t(t * experts + e)], 0.0f);
    }
  }
}

TEST(SwigluBackward, MatchesFiniteDifferencesAwayFromTheClamps) {
  const int64_t n = 3;
  const int inter = 6;
  auto gu = random_floats(size_t(n * 2 * inter), 41, -6.0f, 6.0f);
  gu[0] = 9.0f;   // gate clamped: no gradient to it
  gu[3] = -8.5f;  // up clamped below
  gu[5] = 7.9f;   // up clamped above
  const auto wy = random_floats(size_t(n * inter), 42);
  std::vector<float> h(size_t(n * inter));
  auto loss = [&] {
    swiglu_forward(h.data(), gu.data(), n, inter, 7.0f);
    return weighted_sum(h.data(), wy);
  };
  std::vector<float> dgu(gu.size(), 0.0f);
  swiglu_backward(dgu.data(), wy.data(), gu.data(), n, inter, 7.0f);
  expect_grad("swiglu dgate_up", dgu.data(), numeric_grad(gu.data(), gu.size(), loss, kEps), kTol);
  EXPECT_EQ(dgu[0], 0.0f);
  EXPECT_EQ(dgu[3], 0.0f);
  EXPECT_EQ(dgu[5], 0.0f);
}

TEST(SwigluBackward, GradientPassesAtTheBoundAsTorchClamp) {
  // torch.clamp's backward keeps the gradient where min <= x <= max: at exactly ±limit it
  // passes, one ulp beyond it does not.
  const float L = 7.0f;
  const float above = std::nextafter(L, 100.0f), below = std::nextafter(-L, -100.0f);
  const std::vector<float> gu = {L, L, L, -L, above, above, 1.0f, below};
  const std::vector<float> dh = {1, 1, 1, 1};
  std::vector<float> dgu(gu.size(), 0.0f);
  swiglu_backward(dgu.data(), dh.data(), gu.data(), 1, 4, L);
  const double sig = 1 / (1 + std::exp(-1.702 * 7.0));
  const double dglu = sig + 7.0 * 1.702 * sig * (1 - sig);
  EXPECT_NEAR(dgu[0], (L + 1) * dglu, 1e-5);  // gate == limit passes
  EXPECT_NEAR(dgu[1], 7.0 * sig, 1e-5);       // up == limit passes
  EXPECT_NEAR(dgu[3], 7.0 * sig, 1e-5);       // up == -limit passes
  EXPECT_EQ(dgu[4], 0.0f);                    // gate above the limit
  EXPECT_EQ(dgu[5], 0.0f);                    // up above the limit
  EXPECT_EQ(dgu[7], 0.0f);                    // up below -limit
  EXPECT_NE(dgu[6], 0.0f);
}

TEST(LoraBackward, MatchesFiniteDifferencesWithDropout) {
  for (float p : {0.0f, 0.3f}) {
    const int64_t n = 4, in = 6, out = 5;
    const int r = 3;
    auto a = random_floats(size_t(r * in), 51);
    auto b = random_floats(size_t(out * r), 52);
    auto x = random_floats(size_t(n * in), 53);
    const std::vector<int64_t> ids = {7, 2, 9, 4};
    const auto wy = random_floats(size_t(n * out), 54);
    std::vector<float> ga(a.size(), 0.0f), gb(b.size(), 0.0f), dx(x.size(), 0.0f), y(size_t(n * out));
    LowRankAdapter ad{a.data(), b.data(), ga.data(), gb.data(), r, in, out, 1.5f, p, 99};
    auto loss = [&] {
      std::fill(y.begin(), y.end(), 0.0f);
      lora_forward(y.data(), x.data(), ids.data(), n, ad);
      return weighted_sum(y.data(), wy);
    };
    lora_backward(dx.data(), wy.data(), x.data(), ids.data(), n, ad);
    const std::string tag = p > 0 ? " (dropout)" : "";
    expect_grad("lora grad_a" + tag, ga.data(), numeric_grad(a.data(), a.size(), loss, kEps), 1e-4);
    expect_grad("lora grad_b" + tag, gb.data(), numeric_grad(b.data(), b.size(), loss, kEps), 1e-4);
    expect_grad("lora dx" + tag, dx.data(), numeric_grad(x.data(), x.size(), loss, kEps), 1e-4);
  }
  // The mask drops about p of the inputs and is a function of (key, row id, feature).
  int dropped = 0;
  for (int64_t i = 0; i < 10000; ++i) dropped += lora_dropout_multiplier(5, i / 100, i % 100, 0.25f) == 0.0f;
  EXPECT_NEAR(dropped, 2500, 200);
  EXPECT_EQ(lora_dropout_multiplier(5, 3, 4, 0.25f), lora_dropout_multiplier(5, 3, 4, 0.25f));
  EXPECT_FLOAT_EQ(lora_dropout_multiplier(5, 3, 4, 0.0f), 1.0f);
}

// moe_backward through frozen experts (MXFP4, or dense transposed as transformers saves
// them), per-expert LoRA on both matrices, and a trained router.
class MoeBackward : public ::testing::TestWithParam<bool> {};

TEST_P(MoeBackward, MatchesFiniteDifferences) {
  const bool mxfp4 = GetParam();
  const int hidden = 32, inter = 32, experts = 4, k = 2, r = 2;
  const int64_t n = 8;
  const MoeDims d{hidden, inter, experts, k, 7.0f};
  std::vector<TestMatrix> gate_up, down;
  MoeWeights w;
  for (int e = 0; e < experts; ++e) {
    const WeightFormat f = mxfp4 ? WeightFormat::MXFP4 : WeightFormat::F32;
    gate_up.push_back(make_matrix(f, !mxfp4, 2 * inter, hidden, 60 + e));
    down.push_back(make_matrix(f, !mxfp4, hidden, inter, 70 + e));
  }
  for (int e = 0; e < experts; ++e) {
    w.gate_up.push_back(gate_up[size_t(e)].view);
    w.down.push_back(down[size_t(e)].view);
  }
  w.gate_up_bias = random_floats(size_t(experts * 2 * inter), 61, -0.3f, 0.3f);
  w.down_bias = random_floats(size_t(experts * hidden), 62, -0.3f, 0.3f);
  // The choice varies by token (every expert is used) and no two chosen logits sit within
  // eps of a rival (checked in the loss).
  auto router_w = random_floats(size_t(experts * hidden), 63, -0.5f, 0.5f);
  auto router_b = std::vector<float>{0.0f, 0.1f, -0.1f, 0.2f};
  w.router = fp32_matrix(router_w.data(), experts, hidden);  // unused: the trained copy replaces it
  w.router_bias = router_b;

  LayerAdapters ad;
  std::vector<std::vector<float>> params, grads;
  params.reserve(4 * experts + 2);
  grads.reserve(4 * experts + 2);
  auto make = [&](size_t size, uint64_t seed) -> std::pair<float*, float*> {
    params.push_back(random_floats(size, seed, -0.3f, 0.3f));
    grads.emplace_back(size, 0.0f);
    return {params.back().data(), grads.back().data()};
  };
  for (int e = 0; e < experts; ++e) {
    auto [ga, gga] = make(size_t(r * hidden), 80 + e);
    auto [gb, ggb] = make(size_t(2 * inter * r), 90 + e);
    ad.gate_up_proj.push_back(LowRankAdapter{ga, gb, gga, ggb, r, hidden, 2 * inter, 2.0f, 0.0f, 0});
    auto [da, gda] = make(size_t(r * inter), 100 + e);
    auto [db, gdb] = make(size_t(hidden * r), 110 + e);
    ad.down_proj.push_back(LowRankAdapter{da, db, gda, gdb, r, inter, hidden, 2.0f, 0.0f, 0});
  }
  std::vector<float> grad_rw(router_w.size(), 0.0f), grad_rb(router_b.size(), 0.0f);
  ad.router_weight = router_w.data();
  ad.router_bias = router_b.data();
  ad.grad_router_weight = grad_rw.data();
  ad.grad_router_bias = grad_rb.data();

  auto x = random_floats(size_t(n * hidden), 64, -1.0f, 1.0f);
  const auto wy = random_floats(size_t(n * hidden), 65);
  std::vector<float> out(x.size());
  MoeActivations act;
  std::vector<int32_t> first_index;
  auto loss = [&] {
    MoeActivations a;
    moe_forward(out.data(), &a, x.data(), n, w, d, &ad, false);
    EXPECT_TRUE(first_index.empty() || a.expert_index == first_index) << "the choice moved";
    return weighted_sum(out.data(), wy);
  };
  moe_forward(out.data(), &act, x.data(), n, w, d, &ad, true);
  first_index = act.expert_index;
  for (int e = 0; e < experts; ++e) {
    ASSERT_NE(std::count(first_index.begin(), first_index.end(), e), 0) << "expert " << e << " unused";
  }
  std::vector<float> dx(x.size(), 0.0f);
  moe_backward(dx.data(), wy.data(), x.data(), n, w, d, &ad, act);

  const float eps = 1e-3f;
  expect_grad("moe dx", dx.data(), numeric_grad(x.data(), x.size(), loss, eps), kTol);
  expect_grad("moe router weight", grad_rw.data(), numeric_grad(router_w.data(), router_w.size(), loss, eps), kTol);
  expect_grad("moe router bias", grad_rb.data(), numeric_grad(router_b.data(), router_b.size(), loss, eps), kTol);
  for (size_t i = 0; i < params.size(); ++i) {
    expect_grad("moe adapter " + std::to_string(i), grads[i].data(),
                numeric_grad(params[i].data(), params[i].size(), loss, eps), kTol);
  }
}

INSTANTIATE_TEST_SUITE_P(Experts, MoeBackward, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "Mxfp4" : "DenseTransposed"; });

// Chunked next-token log-probs over a vocabulary wider than one chunk (4096): the same as
// a full log-softmax, entropy included, and the backward matches finite differences.
TEST(LmHead, ChunkedLogProbsMatchFullSoftmaxAndFiniteDifferences) {
  const int64_t vocab = 9000, hidden = 8;
  const auto head = random_floats(size_t(vocab * hidden), 71, -0.5f, 0.5f);
  const WeightMatrix w = fp32_matrix(head.data(), vocab, hidden);
  const std::vector<int32_t> tokens = {5, 4100, 8999, 17, 1, 8200, 4095};
  const std::vector<int32_t> offsets = {0, 4, 5, 7};
  auto hid = random_floats(tokens.size() * size_t(hidden), 72, -2.0f, 2.0f);
  std::vector<float> logp(tokens.size()), lse(tokens.size()), entropy(tokens.size());
  next_token_log_probs(logp.data(), lse.data(), entropy.data(), hid.data(), tokens, offsets, w);
  for (size_t b = 0; b + 1 < offsets.size(); ++b) {
    EXPECT_EQ(logp[size_t(offsets[b])], 0.0f);
    EXPECT_EQ(entropy[size_t(offsets[b])], 0.0f);
    for (int64_t t = offsets[b] + 1; t < offsets[b + 1]; ++t) {
      std::vector<double> z(static_cast<size_t>(vocab));
      double m = -1e300;
      for (int64_t v = 0; v < vocab; ++v) {
        double s = 0;
        for (int64_t i = 0; i < hidden; ++i) s += double(hid[size_t((t - 1) * hidden + i)]) * head[size_t(v * hidden + i)];
        z[size_t(v)] = s;
        m = std::max(m, s);
      }
      double sum = 0, zsum = 0;
      for (double s : z) sum += std::exp(s - m);
      for (double s : z) zsum += std::exp(s - m) * s;
      const double want_lse = m + std::log(sum);
      EXPECT_NEAR(lse[size_t(t)], want_lse, 1e-4);
      EXPECT_NEAR(logp[size_t(t)], z[size_t(tokens[size_t(t)])] - want_lse, 1e-4);
      EXPECT_NEAR(entropy[size_t(t)], want_lse - zsum / sum, 1e-3);
    }
  }
  auto wt = random_floats(tokens.size(), 73);
  wt[2] = 0.0f;  // a zero gradient row is skipped and gets nothing
  auto loss = [&] {
    next_token_log_probs(logp.data(), nullptr, nullptr, hid.data(), tokens, offsets, w);
    return weighted_sum(logp.data(), wt);
  };
  std::vector<float> dh(hid.size(), 0.0f);
  next_token_log_probs_backward(dh.data(), wt.data(), hid.data(), tokens, offsets, lse.data(), w);
  expect_grad("lm_head dhidden", dh.data(), numeric_grad(hid.data(), hid.size(), loss, kEps), kTol);
  for (int64_t i = 0; i < hidden; ++i) {
    EXPECT_EQ(dh[size_t(1 * hidden + i)], 0.0f);  // row 1 predicts token 2, whose weight is 0
    EXPECT_EQ(dh[size_t(3 * hidden + i)], 0.0f);  // a sequence's last row predicts nothing
  }
}

}  // namespace
}  // namespace ossrl
