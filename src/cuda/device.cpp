#include "cuda/device.h"

#include <fmt/format.h>

#include "core/error.h"
#include "cuda/buffer.h"
#include "cuda/check.h"

namespace ossrl::cuda {

void fail_cuda(cudaError_t status, const char* call, const char* file, int line) {
  fail("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(status), cudaGetErrorString(status),
       call, file, line);
}

void fail_allocation(size_t bytes, const char* what, cudaError_t status) {
  size_t free_bytes = 0, total_bytes = 0;
  cudaMemGetInfo(&free_bytes, &total_bytes);
  (void)cudaGetLastError();
  fail("out of GPU memory: asked for {:.2f} GiB ({}), {:.2f} GiB free of {:.2f} GiB ({})",
       double(bytes) / (1 << 30), what, double(free_bytes) / (1 << 30), double(total_bytes) / (1 << 30),
       cudaGetErrorString(status));
}

size_t memory_in_use() {
  size_t free_bytes = 0, total_bytes = 0;
  OSSRL_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return total_bytes - free_bytes;
}

size_t memory_free() {
  size_t free_bytes = 0, total_bytes = 0;
  OSSRL_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return free_bytes;
}

int device_count() {
  int count = 0;
  // No driver or no device is the normal case on CPU machines: report zero devices.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later checks start clean
    return 0;
  }
  return count;
}

std::string device_summary(int index) {
  cudaDeviceProp prop{};
  OSSRL_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  return fmt::format("{}, sm_{}{}, {} SMs, {:.1f} GiB", prop.name, prop.major, prop.minor,
                     prop.multiProcessorCount, double(prop.totalGlobalMem) / (1 << 30));
}

}  // namespace ossrl::cuda
