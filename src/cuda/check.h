// CUDA error checking: every runtime call and every launch goes through these, and a
// failure becomes an ossrl::Error naming the call and where it was made.
// This header stays free of fmt so nvcc can include it: host logic that formats lives
// in .cpp files, kernels in .cu files.
#pragma once

#include <cuda_runtime.h>

namespace ossrl::cuda {
[[noreturn]] void fail_cuda(cudaError_t status, const char* call, const char* file, int line);
}  // namespace ossrl::cuda

#define OSSRL_CUDA_CHECK(call)                                                  \
  do {                                                                          \
    cudaError_t status_ = (call);                                               \
    if (status_ != cudaSuccess) ::ossrl::cuda::fail_cuda(status_, #call, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: catches bad launch configurations at once.
#define OSSRL_CUDA_CHECK_LAUNCH() OSSRL_CUDA_CHECK(cudaGetLastError())
