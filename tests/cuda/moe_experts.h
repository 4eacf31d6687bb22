// One projection's MoE experts for the GPU tests: the host copy (the CPU oracle's WeightMatrix
// per expert) and the device copy (cuda::ExpertWeights). Each test fills the host side with
// the random weights it needs (random_inputs.h), then upload()s. Plus the checks of the expert
// kernels' two outputs against the oracle, each fed what the GPU fed its kernel.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/buffer.h"
#include "cuda/moe.h"
#include "model/weights.h"

namespace ossrl::test {

struct Experts {
  bool mxfp4 = true;
  int experts = 0, out = 0, in = 0;
  std::vector<uint8_t> blocks, scales;  // MXFP4 [experts, out, in/32, 16], [experts, out, in/32]
  std::vector<uint16_t> dense;          // bf16 bits [experts, out, in]
  std::vector<float> bias;              // [experts, out]
  cuda::DeviceBuffer<uint8_t> d_blocks, d_scales;
  cuda::DeviceBuffer<uint16_t> d_dense;
  cuda::DeviceBuffer<float> d_bias;

  Experts() = default;
  Experts(bool is_mxfp4, int n_experts, int n_out, int n_in)
      : mxfp4(is_mxfp4), experts(n_experts), out(n_out), in(n_in) {}

  WeightMatrix matrix(int e) const {
    WeightMatrix m;
    m.out = out;
    m.in = in;
    if (mxfp4) {
      m.format = WeightFormat::MXFP4;
      const size_t row_blocks = size_t(in / 32);
      m.data = blocks.data() + size_t(e) * out * row_blocks * 16;
      m.scales = scales.data() + size_t(e) * out * row_blocks;
    } else {
      m.format = WeightFormat::BF16;
      m.data = reinterpret_cast<const uint8_t*>(dense.data() + size_t(e) * out * in);
    }
    return m;
  }
  void upload() {
    if (mxfp4) {
      d_blocks = cuda::DeviceBuffer<uint8_t>(blocks, "expert blocks");
      d_scales = cuda::DeviceBuffer<uint8_t>(scales, "expert scales");
    } else {
      d_dense = cuda::DeviceBuffer<uint16_t>(dense, "expert weights");
    }
    d_bias = cuda::DeviceBuffer<float>(bias, "expert bias");
  }
  cuda::ExpertWeights view() const {
    cuda::ExpertWeights w;
    w.mxfp4 = mxfp4;
    w.blocks = d_blocks.data();
    w.scales = d_scales.data();
    w.dense = reinterpret_cast<const __nv_bfloat16*>(d_dense.data());
    w.bias = d_bias.data();
    w.experts = experts;
    w.out = out;
    w.in = in;
    return w;
  }
};

// Slots [first, first + rows) of the GPU's h [slots, I] (expert e) against the oracle's SwiGLU
// rows h_ref [rows, I]. The GPU rounds h to bf16 (2^-9 relative) after an fp32 sum in another
// order; SwiGLU's slope (up to ~8 at the clamp) scales that order difference, which stays far
// below 1e-2 of the row's largest |h|. The second term is the bf16 rounding of h itself, the
// input of the down projection. max_err: the largest |error| seen, kept across calls.
inline void expect_swiglu_rows(const std::vector<float>& h, const std::vector<float>& h_ref, int first, int rows,
                               int I, int e, const std::string& name, double& max_err) {
  for (int i = 0; i < rows; ++i) {
    const float* ref = h_ref.data() + int64_t(i) * I;
    const float* got = h.data() + int64_t(first + i) * I;
    float row_max = 0;
    for (int u = 0; u < I; ++u) row_max = std::max(row_max, std::abs(ref[u]));
    for (int u = 0; u < I; ++u) {
      const double err = std::abs(double(got[u]) - ref[u]);
      max_err = std::max(max_err, err);
      ASSERT_LE(err, 1e-2 * row_max + std::ldexp(std::abs(ref[u]), -8))
          << name << ": h slot " << first + i << " (expert " << e << ") unit " << u << ": gpu " << got[u] << " cpu "
          << ref[u] << " (row max " << row_max << ")";
    }
  }
}

// The GPU's y [slots, H] (assignment order) against the oracle's y_ref from the GPU's own h:
// fp32 sums of the same bf16 products in another order, within 1e-3 of max |y| (y_max).
inline void expect_down_rows(const std::vector<float>& y, const std::vector<float>& y_ref, int H,
                             const std::string& name, double& y_max, double& max_err) {
  for (float v : y_ref) y_max = std::max(y_max, double(std::abs(v)));
  for (size_t i = 0; i < y.size(); ++i) {
    const double err = std::abs(double(y[i]) - y_ref[i]);
    max_err = std::max(max_err, err);
    ASSERT_LE(err, 1e-3 * y_max) << name << ": y assignment " << i / size_t(H) << " column " << i % size_t(H)
                                 << ": gpu " << y[i] << " cpu " << y_ref[i] << " (max |y| " << y_max << ")";
  }
}

}  // namespace ossrl::test
