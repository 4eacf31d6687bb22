// Per-expert LoRA in the MoE expert kernels (cuda/moe.h) against the CPU oracle's moe_forward
// (model/cpu/moe.h) with LayerAdapters holding random, nonzero lora_B for every expert of
// gate_up_proj and down_proj: MXFP4 and bf16 experts, every tile shape of the dispatch (so the
// extension both after the main loop, decode tilings, and before it, wide ones), both tilings
// of the u kernel (<= 8 and more slots per expert), ranks below, at and above one k16 step
// (odd ones too), routing from the oracle's router.
//
// Each stage is checked on what the GPU fed it, so errors do not compound:
//   u = scale · act · A_eᵀ (bf16, per slot) against the exact product: within its bf16 rounding;
//   h = SwiGLU(x · W_eᵀ + b + u · B_eᵀ) against the CPU's fp32 from the GPU's own u: moe_test's
//     bound (fp32 order scaled by SwiGLU's slope, plus h's bf16 rounding), as the LoRA terms
//     are exact bf16 products in the same fp32 sums;
//   y = h · D_eᵀ + d + u · B_eᵀ from the GPU's own h and u: 1e-3 of max |y| (fp32 order);
// and the combined output against moe_forward's, where the two differ by the GPU's bf16
// roundings of h and u: within 2e-2 of max |out|, while the adapters move it by more than
// 0.1 of max |out| (so a dropped or misplaced update fails).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda/moe.h"
#include "gpu_test.h"
#include "moe_experts.h"
#include "model/cpu/linear.h"
#include "model/cpu/lora.h"
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

constexpr float kLimit = 7.0f;
constexpr float kScale = 1.75f;  // lora_alpha / r; not a power of two, so a lost scale shows

// One projection's frozen experts, host (the oracle's WeightMatrix views) and device. MXFP4:
// random codes, scales 118..124 (gpt-oss's range); bf16: uniform in +-4/sqrt(in).
Experts frozen_experts(bool mxfp4, int experts, int out, int in, uint64_t seed) {
  Experts w(mxfp4, experts, out, in);
  std::mt19937_64 rng(seed);
  const size_t values = size_t(experts) * out * in;
  if (mxfp4) {
    w.blocks = test::random_bytes(values / 2, rng);
    w.scales.resize(values / 32);
    for (uint8_t& s : w.scales) s = uint8_t(118 + rng() % 7);
  } else {
    w.dense = test::uniform_bf16_bits(values, 4.0f / std::sqrt(float(in)), rng);
  }
  w.bias = uniform_vector(size_t(experts) * out, 0.5f, seed + 1);
  w.upload();
  return w;
}

// One projection's per-expert adapters: bf16-rounded fp32 A [experts, r, in] and B [experts,
// out, r] on the host (the oracle's LowRankAdapter per expert) and on the device (cuda/lora.h's
// stacked layout). A's bound gain/sqrt(in) sets how far the update moves the output.
struct ExpertAdapter {
  int experts, r, in, out;
  std::vector<float> a, b;
  cuda::DeviceBuffer<float> d_a, d_b;
  cuda::DeviceBuffer<uint16_t> d_a16, d_b16;
  cuda::DeviceAdapter view;

  ExpertAdapter(int experts_, int r_, int in_, int out_, float gain, uint64_t seed)
      : experts(experts_),
        r(r_),
        in(in_),
        out(out_),
        a(round_bf16(uniform_vector(size_t(experts) * r * in, gain / std::sqrt(float(in)), seed))),
        b(round_bf16(uniform_vector(size_t(experts) * out * r, 2.0f / std::sqrt(float(r)), seed + 1))),
        d_a(a),
        d_b(b),
        d_a16(to_device_bf16(a)),
        d_b16(to_device_bf16(b)) {
    view.experts = experts;
    view.r = r;
    view.in = in;
    view.out = out;
    view.scale = kScale;
    view.a = d_a.data();
    view.b = d_b.data();
    view.a16 = bf16_ptr(d_a16);
    view.b16 = bf16_ptr(d_b16);
  }
  const float* a_of(int e) const { return a.data() + size_t(e) * r * in; }
  const float* b_of(int e) const { return b.data() + size_t(e) * out * r; }
  std::vector<LowRankAdapter> cpu() const {
    std::vector<LowRankAdapter> v(static_cast<size_t>(experts));
    for (int e = 0; e < experts; ++e) {
      LowRankAdapter& ad = v[size_t(e)];
      ad.a = a_of(e);
      ad.b = b_of(e);
      ad.r = r;
      ad.in = in;
      ad.out = out;
      ad.scale = kScale;
    }
    return v;
  }
};

struct MoeLoraCase {
  std::string name;
  int tokens, hidden, intermediate, experts, k, r;
  bool mxfp4;
  float x_scale;  // |x| bound: 4 on the tiny shapes drives gate/up past the SwiGLU clamp
  float a_gain;   // A's bound times sqrt(in): large enough that the update is a good part of y
};

void PrintTo(const MoeLoraCase& c, std::ostream* os) { *os << c.name; }

class MoeLora : public ::testing::TestWithParam<MoeLoraCase> {};

// u [slots, r] from the GPU against scale · act[row(j)] · A_eᵀ, exact up to u's bf16 rounding
// and the fp32 order (relative to the sum of |terms|).
void expect_u(const std::vector<float>& u, const std::vector<float>& act, const std::vector<int>& act_row,
              const std::vector<int>& expert_of_slot, const ExpertAdapter& ad, const std::string& what) {
  for (size_t j = 0; j < expert_of_slot.size(); ++j) {
    const float* x = act.data() + size_t(act_row[j]) * ad.in;
    const float* a = ad.a_of(expert_of_slot[j]);
    for (int q = 0; q < ad.r; ++q) {
      double exact = 0, terms = 0;
      for (int i = 0; i < ad.in; ++i) {
        exact += double(x[i]) * a[size_t(q) * ad.in + i];
        terms += std::abs(double(x[i]) * a[size_t(q) * ad.in + i]);
      }
      exact *= kScale;
      terms *= kScale;
      const double got = u[j * size_t(ad.r) + q];
      ASSERT_LE(std::abs(got - exact), 1.5 / 256 * std::abs(exact) + 1e-6 * terms)
          << what << " slot " << j << " rank " << q << ": gpu " << got << ", exact " << exact;
    }
  }
}

TEST_P(MoeLora, MatchesCpuMoeForward) {
  OSSRL_REQUIRE_GPU();
  const MoeLoraCase& c = GetParam();
  const int n = c.tokens, k = c.k, H = c.hidden, I = c.intermediate, E = c.experts, r = c.r;
  const Experts gate_up = frozen_experts(c.mxfp4, E, 2 * I, H, 11), down = frozen_experts(c.mxfp4, E, H, I, 12);
  const ExpertAdapter lora_gu(E, r, H, 2 * I, c.a_gain, 13), lora_down(E, r, I, H, c.a_gain, 14);
  const std::vector<float> router = uniform_vector(size_t(E) * H, 2.0f / std::sqrt(float(H)), 15);
  const std::vector<float> x = round_bf16(uniform_vector(size_t(n) * H, c.x_scale, 16));

  // The oracle, with and without the adapters.
  MoeWeights w;
  w.router = fp32_matrix(router.data(), E, H);
  w.router_bias = uniform_vector(size_t(E), 0.5f, 17);
  for (int e = 0; e < E; ++e) {
    w.gate_up.push_back(gate_up.matrix(e));
    w.down.push_back(down.matrix(e));
  }
  w.gate_up_bias = gate_up.bias;
  w.down_bias = down.bias;
  const MoeDims dims{H, I, E, k, kLimit};
  LayerAdapters adapters;
  adapters.gate_up_proj = lora_gu.cpu();
  adapters.down_proj = lora_down.cpu();
  std::vector<float> out(size_t(n) * H), out_base(size_t(n) * H);
  MoeActivations act, act_base;
  moe_forward(out.data(), &act, x.data(), n, w, dims, &adapters, false);
  moe_forward(out_base.data(), &act_base, x.data(), n, w, dims, nullptr, false);

  // The oracle's routing, grouped by expert as cuda/router.h does.
  std::vector<int32_t> offsets(size_t(E) + 1, 0), sorted;
  std::vector<int> slot_expert, slot_token, slot_index;
  for (int e = 0; e < E; ++e) {
    for (int a = 0; a < n * k; ++a) {
      if (act.expert_index[size_t(a)] != e) continue;
      sorted.push_back(a);
      slot_expert.push_back(e);
      slot_token.push_back(a / k);
      slot_index.push_back(int(slot_index.size()));
    }
    offsets[size_t(e) + 1] = int32_t(sorted.size());
  }

  const auto d_x = to_device_bf16(x);
  const cuda::DeviceBuffer<int32_t> d_sorted(sorted), d_offsets(offsets);
  cuda::DeviceBuffer<uint16_t> d_h(size_t(n) * k * I), d_u_gu(size_t(n) * k * r), d_u_down(size_t(n) * k * r);
  cuda::DeviceBuffer<float> d_y(size_t(n) * k * H);
  // Poisoned (NaN) outputs: an element the kernels fail to write shows up.
  OSSRL_CUDA_CHECK(cudaMemset(d_h.data(), 0xff, d_h.bytes()));
  OSSRL_CUDA_CHECK(cudaMemset(d_y.data(), 0xff, d_y.bytes()));
  cuda::moe_gate_up_swiglu(bf16_ptr(d_h), bf16_ptr(d_x), d_sorted.data(), d_offsets.data(), n, k, gate_up.view(),
                           kLimit, nullptr, &lora_gu.view, bf16_ptr(d_u_gu));
  cuda::moe_down(d_y.data(), bf16_ptr(d_h), d_sorted.data(), d_offsets.data(), n, k, down.view(), nullptr,
                 &lora_down.view, bf16_ptr(d_u_down));
  OSSRL_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> h = from_device_bf16(d_h), y = d_y.download();
  const std::vector<float> u_gu = from_device_bf16(d_u_gu), u_down = from_device_bf16(d_u_down);

  expect_u(u_gu, x, slot_token, slot_expert, lora_gu, c.name + ": gate_up u");
  expect_u(u_down, h, slot_index, slot_expert, lora_down, c.name + ": down u");

  // h and y per expert from the GPU's own inputs (x, u_gu; h, u_down).
  double h_max_err = 0, y_max_err = 0, y_max = 0;
  std::vector<float> y_ref(size_t(n) * k * H);  // assignment order
  for (int e = 0; e < E; ++e) {
    const int begin = offsets[size_t(e)], m = offsets[size_t(e) + 1] - begin;
    if (m == 0) continue;
    std::vector<float> xs(size_t(m) * H), gu(size_t(m) * 2 * I), h_ref(size_t(m) * I), ye(size_t(m) * H);
    for (int i = 0; i < m; ++i) std::copy_n(x.begin() + int64_t(slot_token[size_t(begin + i)]) * H, H, xs.begin() + int64_t(i) * H);
    linear_forward(gu.data(), xs.data(), gate_up.matrix(e), gate_up.bias.data() + int64_t(e) * 2 * I, m);
    // + u · B_eᵀ (u already holds the scale).
    auto add_update = [&](float* dst, const std::vector<float>& u, const ExpertAdapter& ad, int slot) {
      const float* b = ad.b_of(e);
      for (int o = 0; o < ad.out; ++o) {
        float sum = 0;
        for (int q = 0; q < r; ++q) sum += u[size_t(slot) * r + q] * b[size_t(o) * r + q];
        dst[o] += sum;
      }
    };
    for (int i = 0; i < m; ++i) add_update(gu.data() + int64_t(i) * 2 * I, u_gu, lora_gu, begin + i);
    swiglu_forward(h_ref.data(), gu.data(), m, I, kLimit);
    ASSERT_NO_FATAL_FAILURE(test::expect_swiglu_rows(h, h_ref, begin, m, I, e, c.name, h_max_err));
    std::vector<float> hs(h.begin() + int64_t(begin) * I, h.begin() + int64_t(begin + m) * I);
    linear_forward(ye.data(), hs.data(), down.matrix(e), down.bias.data() + int64_t(e) * H, m);
    for (int i = 0; i < m; ++i) {
      add_update(ye.data() + int64_t(i) * H, u_down, lora_down, begin + i);
      std::copy_n(ye.begin() + int64_t(i) * H, H, y_ref.begin() + int64_t(sorted[size_t(begin + i)]) * H);
    }
  }
  ASSERT_NO_FATAL_FAILURE(test::expect_down_rows(y, y_ref, H, c.name, y_max, y_max_err));

  // End to end: Σ_s weight · y against moe_forward's output.
  cuda::DeviceBuffer<float> d_out(std::vector<float>(size_t(n) * H, 0.0f)), d_weight(act.expert_weight);
  cuda::moe_combine(d_out.data(), d_y.data(), d_weight.data(), n, k, H, nullptr);
  const std::vector<float> got = d_out.download();
  double out_max = 0, err_max = 0, lora_effect = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    out_max = std::max(out_max, double(std::abs(out[i])));
    err_max = std::max(err_max, std::abs(double(got[i]) - out[i]));
    lora_effect = std::max(lora_effect, std::abs(double(out[i]) - out_base[i]));
  }
  std::printf("%s: max |h err| %.3g, max |y err| %.3g (max |y| %.3g); moe_forward: max |err| %.3g, adapters move "
              "it by %.3g (max |out| %.3g)\n",
              c.name.c_str(), h_max_err, y_max_err, y_max, err_max, lora_effect, out_max);
  EXPECT_LE(err_max, 2e-2 * out_max) << c.name << ": the GPU's MoE output against moe_forward with the adapters";
  EXPECT_GE(lora_effect, 0.1 * out_max) << c.name << ": the adapters barely move the oracle; the test would not see "
                                                      "an update dropped";
}

std::vector<MoeLoraCase> cases() {
  std::vector<MoeLoraCase> v;
  // Tiny model (hidden 64, intermediate 64, 8 experts, top-4): token counts reach every tile
  // shape of the dispatch (mean rows per expert 0.5 .. 500).
  for (int tokens : {1, 30, 129, 1000}) {
    v.push_back({"tiny_mxfp4_r16_" + std::to_string(tokens), tokens, 64, 64, 8, 4, 16, true, 4.0f, 1.0f});
  }
  for (int tokens : {1, 129}) {
    v.push_back({"tiny_bf16_r4_" + std::to_string(tokens), tokens, 64, 64, 8, 4, 4, false, 4.0f, 1.0f});
  }
  v.push_back({"tiny_mxfp4_r4_60", 60, 64, 64, 8, 4, 4, true, 4.0f, 1.0f});
  // Odd sizes (partial pipeline stages and feature tiles) with an odd rank (a k pair split by
  // r's end) and one over a k16 step and a u pass (r 20).
  for (int tokens : {5, 300}) {
    v.push_back({"odd_mxfp4_r5_" + std::to_string(tokens), tokens, 160, 96, 6, 2, 5, true, 4.0f, 1.0f});
  }
  v.push_back({"odd_bf16_r20_300", 300, 160, 96, 6, 2, 20, false, 4.0f, 1.0f});
  // gpt-oss-20b (hidden 2880, intermediate 2880, 32 experts, top-4), decode and a small batch.
  for (int tokens : {1, 64}) {
    v.push_back({"gpt_oss_20b_mxfp4_r16_" + std::to_string(tokens), tokens, 2880, 2880, 32, 4, 16, true, 1.0f, 4.0f});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, MoeLora, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<MoeLoraCase>& info) { return info.param.name; });

}  // namespace
}  // namespace ossrl
