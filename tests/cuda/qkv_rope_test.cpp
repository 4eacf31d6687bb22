// The fused attention input (cuda/gemv.h skinny_qkv_rope_forward: norm + qkv + rope + KV write
// in one launch) against the three launches it replaces on the GPU (rmsnorm_forward, the
// skinny linear_forward, rope_qkv_forward), over gpt-oss-20b's shape at every token-tile case
// and a small shape whose k is split over a cluster, with a padding token (negative KV slot).
//
// Tolerance: the two sides differ only where the fused norm's sum of squares (another fp32
// order) moves rstd by an ulp and flips the bf16 rounding of a normed element: each flip moves
// an output by ~2^-8 of one product term, about 1e-4 of max |q| at hidden 2880; a wrong row
// pairing, bias, angle or cache slot is off by ~1e-1 or more. So q within 2e-3 of max |q|; the
// bf16 cache rows within that plus one bf16 ulp of the value; untouched rows exactly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include "cuda/gemv.h"
#include "cuda/linear.h"
#include "cuda/rmsnorm.h"
#include "cuda/rope.h"
#include "gpu_test.h"

namespace ossrl {
namespace {

using test::from_device_bf16;
using test::to_device_bf16;

struct Shape {
  int n, hidden, heads, kv_heads, head_dim;
};

std::vector<float> normal_vector(size_t n, uint64_t seed, float mean, float stddev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

__nv_bfloat16* bf16(cuda::DeviceBuffer<uint16_t>& b) { return reinterpret_cast<__nv_bfloat16*>(b.data()); }

float max_abs(const std::vector<float>& v) {
  float m = 0.0f;
  for (float x : v) m = std::max(m, std::abs(x));
  return m;
}

// got vs want elementwise within tolerance(i); reports the worst element.
template <class Tolerance>
void expect_close(const std::vector<float>& got, const std::vector<float>& want, Tolerance tolerance,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t worst = 0, bad = 0;
  double worst_excess = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(double(got[i]) - double(want[i])), excess = err - tolerance(i);
    if (excess > 0) ++bad;
    if (excess > worst_excess) worst_excess = excess, worst = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements off; worst at " << worst
                     << ": got " << got[worst] << ", want " << want[worst] << " (tolerance " << tolerance(worst)
                     << ")";
}

TEST(CudaLinear, QkvRopeFusedMatchesUnfused) {
  OSSRL_REQUIRE_GPU();
  const Shape shapes[] = {{1, 2880, 64, 8, 64},  {3, 2880, 64, 8, 64}, {8, 2880, 64, 8, 64},
                          {9, 2880, 64, 8, 64},  {16, 2880, 64, 8, 64}, {5, 64, 4, 2, 16}, {16, 64, 4, 2, 32}};
  constexpr float kUntouched = 7.0f;
  for (const Shape& s : shapes) {
    const std::string shape = "n " + std::to_string(s.n) + ", hidden " + std::to_string(s.hidden) + ", heads " +
                              std::to_string(s.heads) + "/" + std::to_string(s.kv_heads) + " x " +
                              std::to_string(s.head_dim);
    const int out = (s.heads + 2 * s.kv_heads) * s.head_dim, half = s.head_dim / 2;
    const int slots = s.n + 3;
    // Residual rows at a residual stream's scale, norm weights around 1, bias at the product's scale.
    cuda::DeviceBuffer<float> residual(normal_vector(size_t(s.n) * s.hidden, 11, 0.0f, 3.0f));
    cuda::DeviceBuffer<float> norm_weight(normal_vector(size_t(s.hidden), 12, 1.0f, 0.2f));
    cuda::DeviceBuffer<uint16_t> w = to_device_bf16(normal_vector(size_t(out) * s.hidden, 13, 0.0f, 0.05f));
    cuda::DeviceBuffer<float> bias(normal_vector(size_t(out), 14, 0.0f, 1.0f));
    std::vector<float> inv_freq(static_cast<size_t>(half));
    for (int j = 0; j < half; ++j) inv_freq[size_t(j)] = std::pow(150000.0f, -2.0f * float(j) / float(s.head_dim));
    cuda::DeviceBuffer<float> inv_freq_d(inv_freq);
    std::vector<int32_t> positions(size_t(s.n)), kv_slots(size_t(s.n));
    for (int i = 0; i < s.n; ++i) {
      positions[size_t(i)] = 37 * i + (i % 2 == 0 ? 5 : 70000);  // small and large angles
      kv_slots[size_t(i)] = i == s.n / 2 && s.n > 1 ? -1 : slots - 1 - i;  // one padding token
    }
    cuda::DeviceBuffer<int32_t> positions_d(positions), kv_slots_d(kv_slots);
    const float eps = 1e-5f, scaling = 1.35f;
    const size_t cache = size_t(slots) * s.kv_heads * s.head_dim, q_size = size_t(s.n) * s.heads * s.head_dim;

    // The unfused sequence.
    cuda::DeviceBuffer<uint16_t> normed(size_t(s.n) * s.hidden);
    cuda::DeviceBuffer<float> qkv(size_t(s.n) * out), want_q(q_size);
    cuda::DeviceBuffer<uint16_t> want_k = to_device_bf16(std::vector<float>(cache, kUntouched));
    cuda::DeviceBuffer<uint16_t> want_v = to_device_bf16(std::vector<float>(cache, kUntouched));
    cuda::rmsnorm_forward(bf16(normed), residual.data(), norm_weight.data(), nullptr, s.n, s.hidden, eps, nullptr);
    cuda::skinny_linear_forward(qkv.data(), bf16(normed), bf16(w), bias.data(), s.n, s.hidden, out, false, nullptr);
    cuda::rope_qkv_forward(want_q.data(), bf16(want_k), bf16(want_v), qkv.data(), positions_d.data(),
                           kv_slots_d.data(), inv_freq_d.data(), scaling, s.n, s.heads, s.kv_heads, s.head_dim,
                           nullptr);

    // The fused launch.
    cuda::DeviceBuffer<float> got_q(std::vector<float>(q_size, kUntouched));
    cuda::DeviceBuffer<uint16_t> got_k = to_device_bf16(std::vector<float>(cache, kUntouched));
    cuda::DeviceBuffer<uint16_t> got_v = to_device_bf16(std::vector<float>(cache, kUntouched));
    const cuda::QkvRopeOperands op{.q_out = got_q.data(),
                                   .k_cache = bf16(got_k),
                                   .v_cache = bf16(got_v),
                                   .residual = residual.data(),
                                   .norm_weight = norm_weight.data(),
                                   .eps = eps,
                                   .w = bf16(w),
                                   .bias = bias.data(),
                                   .positions = positions_d.data(),
                                   .kv_slots = kv_slots_d.data(),
                                   .inv_freq = inv_freq_d.data(),
                                   .attention_scaling = scaling,
                                   .n = s.n,
                                   .hidden = s.hidden,
                                   .heads = s.heads,
                                   .kv_heads = s.kv_heads,
                                   .head_dim = s.head_dim};
    ASSERT_TRUE(cuda::skinny_qkv_rope_fits(op)) << shape;
    cuda::skinny_qkv_rope_forward(op, nullptr);

    const std::vector<float> wq = want_q.download(), wk = from_device_bf16(want_k), wv = from_device_bf16(want_v);
    const double q_tol = 2e-3 * max_abs(wq);
    expect_close(got_q.download(), wq, [&](size_t) { return q_tol; }, shape + ": q");
    const auto cache_tolerance = [](const std::vector<float>& want) {
      const double tol = 2e-3 * max_abs(want);
      return [&want, tol](size_t i) { return want[i] == kUntouched ? 0.0 : tol + std::abs(want[i]) * 0x1p-8; };
    };
    expect_close(from_device_bf16(got_k), wk, cache_tolerance(wk), shape + ": k cache");
    expect_close(from_device_bf16(got_v), wv, cache_tolerance(wv), shape + ": v cache");
  }
}

}  // namespace
}  // namespace ossrl
