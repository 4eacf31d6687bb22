#include <gtest/gtest.h>

#include "cuda/device.h"

namespace ossrl {
namespace {

TEST(CudaDevice, DescribesEachGpu) {
  const int count = cuda::device_count();
  if (count == 0) GTEST_SKIP() << "no GPU on this machine";
  for (int i = 0; i < count; ++i) {
    const std::string summary = cuda::device_summary(i);
    EXPECT_NE(summary.find("sm_"), std::string::npos) << summary;
  }
}

}  // namespace
}  // namespace ossrl
