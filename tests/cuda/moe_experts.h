// One projection's MoE experts for the GPU tests: the host copy (the CPU oracle's WeightMatrix
// per expert) and the device copy (cuda::ExpertWeights). Each test fills the host side with
// the random weights it needs (random_inputs.h), then upload()s.
#pragma once

#include <cstdint>
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

}  // namespace ossrl::test
