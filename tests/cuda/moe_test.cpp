// The MoE expert kernels (cuda/moe.h) against the CPU oracle: linear_forward over the same
// MXFP4 / bf16 weights (decoded by io/mxfp4) and swiglu_forward, on random weights, inputs and
// routing, over shapes that hit every tile shape of the dispatch, the K and feature tails and
// experts with no rows; plus a bit-exact check of the MXFP4 decode over all 256 scales.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda/moe.h"
#include "gpu_test.h"
#include "moe_experts.h"
#include "model/cpu/linear.h"
#include "model/cpu/moe.h"
#include "model/weights.h"

namespace ossrl {
namespace {

using test::bf16_ptr;
using test::Experts;
using test::from_device_bf16;
using test::round_bf16;
using test::to_device_bf16;
using test::uniform_vector;

// Random weights: MXFP4 codes uniform over all 16, scales in [118, 124] (|w| up to 6 * 2^-3,
// the range of gpt-oss's experts); bf16 uniform in +-4/sqrt(in) (wide enough that x in +-4
// drives some gate/up values past the SwiGLU clamp).
Experts random_experts(bool mxfp4, int experts, int out, int in, uint64_t seed) {
  Experts w(mxfp4, experts, out, in);
  std::mt19937_64 rng(seed);
  const size_t values = size_t(experts) * out * in;
  if (mxfp4) {
    w.blocks = test::random_bytes(values / 2, rng);
    w.scales.resize(values / 32);
    std::uniform_int_distribution<int> scale(118, 124);
    for (uint8_t& s : w.scales) s = uint8_t(scale(rng));
  } else {
    w.dense = test::uniform_bf16_bits(values, 4.0f / std::sqrt(float(in)), rng);
  }
  w.bias = uniform_vector(size_t(experts) * out, 0.5f, rng);
  w.upload();
  return w;
}

// Routing as cuda/router.h groups it: k distinct experts per token (never one of `unused`),
// slots a = t*k + s grouped by expert, ascending a within an expert.
struct Routing {
  std::vector<int32_t> expert_index;  // [n, k]
  std::vector<int32_t> offsets;       // [experts + 1]
  std::vector<int32_t> sorted;        // [n*k]
};

Routing random_routing(int n, int k, int experts, const std::vector<int>& unused, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> allowed;
  for (int e = 0; e < experts; ++e) {
    if (std::find(unused.begin(), unused.end(), e) == unused.end()) allowed.push_back(e);
  }
  Routing r;
  r.expert_index.resize(size_t(n) * k);
  for (int t = 0; t < n; ++t) {
    std::shuffle(allowed.begin(), allowed.end(), rng);
    for (int s = 0; s < k; ++s) r.expert_index[size_t(t) * k + s] = allowed[size_t(s)];
  }
  r.offsets.assign(size_t(experts) + 1, 0);
  for (int e = 0; e < experts; ++e) {
    for (int a = 0; a < n * k; ++a) {
      if (r.expert_index[size_t(a)] == e) r.sorted.push_back(a);
    }
    r.offsets[size_t(e) + 1] = int32_t(r.sorted.size());
  }
  return r;
}

struct MoeCase {
  std::string name;
  int tokens, hidden, intermediate, experts, k;
  bool mxfp4;
  std::vector<int> unused_experts;  // experts that get no rows
  float x_scale;                    // |x| bound: large enough that the SwiGLU clamp is exercised
};

void PrintTo(const MoeCase& c, std::ostream* os) { *os << c.name; }

class MoeKernels : public ::testing::TestWithParam<MoeCase> {};

// gate_up + SwiGLU, then down, then combine, each against the CPU oracle fed what the GPU
// fed the kernel (so errors do not compound from one stage to the next).
TEST_P(MoeKernels, MatchCpuReference) {
  OSSRL_REQUIRE_GPU();
  const MoeCase& c = GetParam();
  const int n = c.tokens, k = c.k, H = c.hidden, I = c.intermediate;
  const float limit = 7.0f;
  const Experts gate_up = random_experts(c.mxfp4, c.experts, 2 * I, H, 11);
  const Experts down = random_experts(c.mxfp4, c.experts, H, I, 12);
  const Routing routing = random_routing(n, k, c.experts, c.unused_experts, 13);
  for (int e : c.unused_experts) ASSERT_EQ(routing.offsets[size_t(e)], routing.offsets[size_t(e) + 1]);
  const std::vector<float> x = round_bf16(uniform_vector(size_t(n) * H, c.x_scale, 14));

  const auto d_x = to_device_bf16(x);
  const cuda::DeviceBuffer<int32_t> d_sorted(routing.sorted), d_offsets(routing.offsets);
  // Poisoned (NaN) outputs: an element the kernels fail to write shows up.
  cuda::DeviceBuffer<uint16_t> d_h(size_t(n) * k * I);
  cuda::DeviceBuffer<float> d_y(size_t(n) * k * H);
  OSSRL_CUDA_CHECK(cudaMemset(d_h.data(), 0xff, d_h.bytes()));
  OSSRL_CUDA_CHECK(cudaMemset(d_y.data(), 0xff, d_y.bytes()));
  cuda::moe_gate_up_swiglu(bf16_ptr(d_h), bf16_ptr(d_x), d_sorted.data(), d_offsets.data(), n, k, gate_up.view(),
                           limit, nullptr);
  cuda::moe_down(d_y.data(), bf16_ptr(d_h), d_sorted.data(), d_offsets.data(), n, k, down.view(), nullptr);
  OSSRL_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> h = from_device_bf16(d_h);
  const std::vector<float> y = d_y.download();

  double h_max_err = 0, y_max_err = 0, y_max = 0;
  int64_t clamped = 0;
  std::vector<float> ys_ref(size_t(n) * k * H);  // the oracle's y, assignment order
  for (int e = 0; e < c.experts; ++e) {
    const int begin = routing.offsets[size_t(e)], m = routing.offsets[size_t(e) + 1] - begin;
    if (m == 0) continue;
    std::vector<float> xs(size_t(m) * H), gu(size_t(m) * 2 * I), h_ref(size_t(m) * I), y_ref(size_t(m) * H);
    for (int i = 0; i < m; ++i) {
      const int t = routing.sorted[size_t(begin + i)] / k;
      std::copy_n(x.begin() + int64_t(t) * H, H, xs.begin() + int64_t(i) * H);
    }
    linear_forward(gu.data(), xs.data(), gate_up.matrix(e), gate_up.bias.data() + int64_t(e) * 2 * I, m);
    for (float v : gu) clamped += std::abs(v) > limit;
    swiglu_forward(h_ref.data(), gu.data(), m, I, limit);
    ASSERT_NO_FATAL_FAILURE(test::expect_swiglu_rows(h, h_ref, begin, m, I, e, c.name, h_max_err));
    // y from the GPU's own bf16 h, so only the down projection's error is measured.
    std::vector<float> hs(h.begin() + int64_t(begin) * I, h.begin() + int64_t(begin + m) * I);
    linear_forward(y_ref.data(), hs.data(), down.matrix(e), down.bias.data() + int64_t(e) * H, m);
    for (int i = 0; i < m; ++i) {
      const int a = routing.sorted[size_t(begin + i)];
      std::copy_n(y_ref.begin() + int64_t(i) * H, H, ys_ref.begin() + int64_t(a) * H);
    }
  }
  ASSERT_NO_FATAL_FAILURE(test::expect_down_rows(y, ys_ref, H, c.name, y_max, y_max_err));
  if (c.x_scale > 1) EXPECT_GT(clamped, 0) << "the SwiGLU clamp was not exercised";

  // combine: residual += Σ_s w[t,s] y[t*k+s].
  const std::vector<float> residual = uniform_vector(size_t(n) * H, 1.0f, 15);
  const std::vector<float> weight = uniform_vector(size_t(n) * k, 1.0f, 16);
  cuda::DeviceBuffer<float> d_residual(residual), d_weight(weight);
  cuda::moe_combine(d_residual.data(), d_y.data(), d_weight.data(), n, k, H, nullptr);
  const std::vector<float> combined = d_residual.download();
  for (int t = 0; t < n; ++t) {
    for (int col = 0; col < H; ++col) {
      float sum = 0, mag = 0;
      for (int s = 0; s < k; ++s) {
        const float term = weight[size_t(t) * k + s] * y[(size_t(t) * k + s) * H + col];
        sum += term;
        mag += std::abs(term);
      }
      const size_t i = size_t(t) * H + col;
      const float want = residual[i] + sum;
      ASSERT_NEAR(combined[i], want, 1e-6f * (std::abs(residual[i]) + mag))
          << c.name << ": combine token " << t << " column " << col;
    }
  }
  std::printf("%s: max |h err| %.3g, max |y err| %.3g (max |y| %.3g), %lld clamped gate/up values\n",
              c.name.c_str(), h_max_err, y_max_err, y_max, static_cast<long long>(clamped));
}

std::vector<MoeCase> cases() {
  std::vector<MoeCase> v;
  // Tiny model: hidden 64, intermediate 64, 8 experts, top-4. Token counts reach every tile
  // shape of the dispatch (mean rows per expert 0.5 .. 500); expert 5 gets no rows.
  for (int tokens : {1, 3, 30, 60, 127, 128, 129, 1000}) {
    v.push_back({"tiny_mxfp4_" + std::to_string(tokens), tokens, 64, 64, 8, 4, true, {5}, 4.0f});
  }
  for (int tokens : {1, 30, 129, 1000}) {
    v.push_back({"tiny_bf16_" + std::to_string(tokens), tokens, 64, 64, 8, 4, false, {5}, 4.0f});
  }
  // Odd sizes: in 160 and 96 (5 and 3 blocks: partial pipeline stages), out 192 and 160
  // (partial feature tiles).
  for (int tokens : {5, 300}) {
    v.push_back({"odd_mxfp4_" + std::to_string(tokens), tokens, 160, 96, 6, 2, true, {0}, 4.0f});
    v.push_back({"odd_bf16_" + std::to_string(tokens), tokens, 160, 96, 6, 2, false, {0}, 4.0f});
  }
  // Prefill tiles over enough of K (hidden 1024, intermediate 512: 8 and 4..8 pipeline stages)
  // that every stage buffer is refilled.
  for (bool mxfp4 : {true, false}) {
    v.push_back({std::string("mid_") + (mxfp4 ? "mxfp4" : "bf16") + "_600", 600, 1024, 512, 8, 2, mxfp4, {}, 1.0f});
  }
  // gpt-oss-20b: hidden 2880, intermediate 2880, 32 experts, top-4. On an H100, 1 and 2 tokens
  // take the streaming kernel, 4 tokens for down only, 8 and more the tiled one.
  for (int tokens : {1, 2, 4, 8, 64, 120, 300}) {
    v.push_back({"gpt_oss_20b_mxfp4_" + std::to_string(tokens), tokens, 2880, 2880, 32, 4, true, {7}, 1.0f});
  }
  v.push_back({"gpt_oss_20b_shape_bf16_64", 64, 2880, 2880, 4, 4, false, {}, 1.0f});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, MoeKernels, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<MoeCase>& info) { return info.param.name; });

// Every scale 0..255 with every code, through the matmul with one-hot inputs: y[t, o] =
// W[o, t mod 64] * 2^(+-20) must equal the CPU's (io/mxfp4's exact ldexp decode) bit for bit.
// The 2^20 half checks every nonzero weight as an fp32 normal (the smallest, 2^-128, gives
// 2^-108); the 2^-20 half keeps the largest (up to 1.5 * 2^129 -> inf) finite where they are.
// Routed two ways: the 128 tokens on one expert (the tiled kernel), and 16 tokens on expert 0
// then one on each of 112 copies of it (few slots an expert: the streaming kernel on an H100,
// with an expert of two 8-slot tiles). out = 264 is not a multiple of 16: a partial feature
// tile.
void check_mxfp4_decode(int first_expert_tokens) {
  const int in = 64, blocks_per_row = in / 32, tokens = 128;
  Experts w;
  w.mxfp4 = true;
  w.experts = 1;
  w.in = in;
  std::mt19937_64 rng(21);
  // Rows 0..255: scales 0..252 (twice), any code: all finite.
  // Rows 256..261: scales 253, 254, 255 with the codes that stay finite (|fp4| <= 3, 1.5, 0.5).
  // Row 262: scale 255, code 1.0 at k = 0 -> +inf, zeros elsewhere (stay 0).
  // Row 263: scale 254, code -6.0 at k = 5 -> -inf.
  struct Row {
    int scale;
    int max_magnitude_code;  // codes 0..this (and their negatives)
  };
  std::vector<Row> rows;
  for (int r = 0; r < 256; ++r) rows.push_back({-1, 7});
  for (int s : {253, 253, 254, 254, 255, 255}) rows.push_back({s, s == 253 ? 5 : s == 254 ? 3 : 1});
  w.out = int(rows.size()) + 2;
  w.blocks.assign(size_t(w.out) * blocks_per_row * 16, 0);
  w.scales.assign(size_t(w.out) * blocks_per_row, 0);
  for (int r = 0; r < int(rows.size()); ++r) {
    for (int b = 0; b < blocks_per_row; ++b) {
      const int block = r * blocks_per_row + b;
      w.scales[size_t(block)] = uint8_t(rows[size_t(r)].scale < 0 ? block % 253 : rows[size_t(r)].scale);
      std::uniform_int_distribution<int> magnitude(0, rows[size_t(r)].max_magnitude_code), sign(0, 1);
      for (int i = 0; i < 16; ++i) {
        const int lo = magnitude(rng) | sign(rng) << 3, hi = magnitude(rng) | sign(rng) << 3;
        w.blocks[size_t(block) * 16 + i] = uint8_t(lo | hi << 4);
      }
    }
  }
  const int inf_row = int(rows.size()), neg_inf_row = inf_row + 1;
  for (int b = 0; b < blocks_per_row; ++b) {
    w.scales[size_t(inf_row * blocks_per_row + b)] = 255;
    w.scales[size_t(neg_inf_row * blocks_per_row + b)] = 254;
  }
  w.blocks[size_t(inf_row) * blocks_per_row * 16] = 0x02;           // k 0: +1.0
  w.blocks[size_t(neg_inf_row) * blocks_per_row * 16 + 2] = 0xf0;   // k 5: -6.0
  // Expert 0's tokens, then one expert (a copy of the weights) for each token left.
  w.experts = 1 + tokens - first_expert_tokens;
  const std::vector<uint8_t> expert_blocks = w.blocks, expert_scales = w.scales;
  for (int e = 1; e < w.experts; ++e) {
    w.blocks.insert(w.blocks.end(), expert_blocks.begin(), expert_blocks.end());
    w.scales.insert(w.scales.end(), expert_scales.begin(), expert_scales.end());
  }
  w.bias.assign(size_t(w.experts) * w.out, 0.0f);
  w.upload();

  std::vector<float> x(size_t(tokens) * in, 0.0f);
  for (int t = 0; t < tokens; ++t) x[size_t(t) * in + t % in] = std::ldexp(1.0f, t < in ? 20 : -20);
  std::vector<int32_t> sorted(static_cast<size_t>(tokens)), offsets = {0};
  std::iota(sorted.begin(), sorted.end(), 0);
  for (int end = first_expert_tokens; end <= tokens; ++end) offsets.push_back(end);
  const auto d_x = to_device_bf16(x);
  const cuda::DeviceBuffer<int32_t> d_sorted(sorted), d_offsets(offsets);
  cuda::DeviceBuffer<float> d_y(size_t(tokens) * w.out);
  cuda::moe_down(d_y.data(), bf16_ptr(d_x), d_sorted.data(), d_offsets.data(), tokens, 1, w.view(), nullptr);
  const std::vector<float> y = d_y.download();
  std::vector<float> want(y.size());
  linear_forward(want.data(), x.data(), w.matrix(0), nullptr, tokens);

  int infinities = 0;
  for (int t = 0; t < tokens; ++t) {
    for (int o = 0; o < w.out; ++o) {
      const float got = y[size_t(t) * w.out + o], ref = want[size_t(t) * w.out + o];
      infinities += std::isinf(ref);
      if (std::isnan(ref) && std::isnan(got)) continue;
      // An fp32 subnormal product (2^-128 * 2^-20) may be flushed by the tensor core; that
      // weight is checked exactly by its 2^20 token.
      if (std::abs(ref) < std::numeric_limits<float>::min() && got == 0.0f) continue;
      ASSERT_EQ(got, ref) << "token " << t << " row " << o << " (scale "
                          << int(w.scales[size_t(o * blocks_per_row + (t % in) / 32)]) << ")";
    }
  }
  EXPECT_GE(infinities, 4);  // rows 262 and 263 at their hot tokens
}

TEST(MoeKernels, Mxfp4DecodeIsExact) {
  OSSRL_REQUIRE_GPU();
  for (int first_expert_tokens : {128, 16}) {
    SCOPED_TRACE("tokens on expert 0: " + std::to_string(first_expert_tokens));
    ASSERT_NO_FATAL_FAILURE(check_mxfp4_decode(first_expert_tokens));
  }
}

}  // namespace
}  // namespace ossrl
