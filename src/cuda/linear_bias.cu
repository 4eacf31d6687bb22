#include "cuda/linear_bias.h"

#include <cstdint>

#include "cuda/check.h"

namespace ossrl::cuda {

namespace {

// y [n, out] fp32 += bias [out]: one thread per element, grid-stride over n*out.
__global__ void add_row_bias_kernel(float* y, const float* bias, int64_t n, int out) {
  const int64_t total = n * out;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    y[i] += bias[i % out];
  }
}

}  // namespace

void add_row_bias(float* y, const float* bias, int n, int out, cudaStream_t stream) {
  const int64_t total = int64_t(n) * out;
  if (total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  add_row_bias_kernel<<<unsigned(blocks < 65536 ? blocks : 65536), kThreads, 0, stream>>>(y, bias, n, out);
  OSSRL_CUDA_CHECK_LAUNCH();
}

}  // namespace ossrl::cuda
