// Shared by the GPU tests: skip cleanly where there is no GPU, and move bf16 data between
// host fp32 and device bf16 buffers.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "cuda/buffer.h"
#include "cuda/device.h"

// First line of every GPU test: the CPU-only CI machine reports a skip, not a pass.
#define OSSRL_REQUIRE_GPU()                                                   \
  do {                                                                        \
    if (::ossrl::cuda::device_count() == 0) GTEST_SKIP() << "no GPU on this machine"; \
  } while (0)

namespace ossrl::test {

// fp32 values rounded to bf16 on the device (the rounded values are what the CPU oracle must
// see too: round_bf16 gives them).
inline cuda::DeviceBuffer<uint16_t> to_device_bf16(const std::vector<float>& host) {
  std::vector<uint16_t> bits(host.size());
  for (size_t i = 0; i < host.size(); ++i) bits[i] = f32_to_bf16(host[i]);
  return cuda::DeviceBuffer<uint16_t>(bits);
}
inline std::vector<float> round_bf16(std::vector<float> v) {
  for (float& x : v) x = bf16_to_f32(f32_to_bf16(x));
  return v;
}
inline std::vector<float> from_device_bf16(const cuda::DeviceBuffer<uint16_t>& buffer) {
  const std::vector<uint16_t> bits = buffer.download();
  std::vector<float> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_to_f32(bits[i]);
  return out;
}

}  // namespace ossrl::test
