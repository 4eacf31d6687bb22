// Shared by the GPU tests: skip cleanly where there is no GPU, move bf16 data between host fp32
// and device bf16 buffers, and compare a result with its oracle (random_inputs.h draws the inputs).
#pragma once

#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda/buffer.h"
#include "cuda/device.h"
#include "random_inputs.h"

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
// The kernels' view of a buffer of bf16 bits.
inline const __nv_bfloat16* bf16_ptr(const cuda::DeviceBuffer<uint16_t>& buffer) {
  return reinterpret_cast<const __nv_bfloat16*>(buffer.data());
}
inline __nv_bfloat16* bf16_ptr(cuda::DeviceBuffer<uint16_t>& buffer) {
  return reinterpret_cast<__nv_bfloat16*>(buffer.data());
}

// One failure per call, naming how many elements are off and the worst one (index, values),
// when |got[i] - want[i]| > tolerance(i) anywhere.
template <class Got, class Want, class Tolerance>
void expect_close(const std::vector<Got>& got, const std::vector<Want>& want, Tolerance tolerance,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, worst = 0;
  double worst_excess = -1.0, max_error = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double error = std::abs(double(got[i]) - double(want[i]));
    max_error = std::max(max_error, error);
    if (error <= tolerance(i)) continue;  // NaN fails here too
    ++bad;
    const double excess = std::isnan(error) ? std::numeric_limits<double>::infinity() : error - tolerance(i);
    if (excess > worst_excess) worst_excess = excess, worst = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements beyond tolerance; worst at ["
                     << worst << "]: got " << got[worst] << ", want " << want[worst] << ", tolerance "
                     << tolerance(worst) << "; max abs error " << max_error;
}

}  // namespace ossrl::test
