// RMSNorm: fp32 residual rows in, bf16 rows out for the next matmul.
#include "cuda/rmsnorm.h"

#include <cstdint>

#include "cuda/check.h"
#include "cuda/launch.cuh"
#include "cuda/rmsnorm_row.cuh"

namespace ossrl::cuda {
namespace {

// out [n, hidden] bf16, row i = weight * (x[r] * rstd) with r = rows ? rows[i] : i and
// rstd = 1 / sqrt(mean(x[r]^2) + eps); x [*, hidden] fp32, weight [hidden] fp32. One CTA of
// kThreads per row, kVec elements per access. The row is read twice (sum of squares, then
// scale); the second read hits L1. A programmatic dependent (cuda/launch.cuh), released after
// its wait.
template <int kThreads, int kVec>
__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(__nv_bfloat16* out, const float* x, const float* weight,
                                                           const int32_t* rows, int hidden, float eps) {
  using Row = RmsnormRow<kThreads, kVec>;
  __shared__ typename Row::Storage storage;
  wait_for_producers();
  release_dependents();
  const int64_t i = blockIdx.x;
  const int64_t r = rows ? rows[i] : i;
  const float* xr = x + r * hidden;
  const float rstd = Row::rstd(xr, hidden, eps, storage);
  auto* o = reinterpret_cast<Pack<__nv_bfloat16, kVec>*>(out + i * hidden);
  for (int p = threadIdx.x; p < hidden / kVec; p += kThreads) o[p] = Row::scale(xr, weight, p, rstd);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Backward, dx [n, hidden] fp32 += r · (w·dy - (x·r) · mean(w·dy·(x·r))) per row with r the
// forward's rstd; dy, x [n, hidden] fp32, weight [hidden] fp32. One CTA of kThreads per row, as
// the forward: r comes from the same RmsnormRow reduction, so it is the forward's r bit for bit.
// The products are grouped as model/cpu/rmsnorm.cpp groups them.
template <int kThreads, int kVec>
__global__ void __launch_bounds__(kThreads) rmsnorm_backward_kernel(float* dx, const float* dy, const float* x,
                                                                    const float* weight, int hidden, float eps) {
  using Row = RmsnormRow<kThreads, kVec>;
  using Vec = Pack<float, kVec>;
  __shared__ typename Row::Storage storage;
  __shared__ float mean_shared;
  const int64_t offset = int64_t(blockIdx.x) * hidden;
  const float rstd = Row::rstd(x + offset, hidden, eps, storage);  // ends in __syncthreads: reduce is free
  const auto* xr = reinterpret_cast<const Vec*>(x + offset);
  const auto* dyr = reinterpret_cast<const Vec*>(dy + offset);
  const auto* w = reinterpret_cast<const Vec*>(weight);
  auto* dxr = reinterpret_cast<Vec*>(dx + offset);
  float dot = 0.0f;
  for (int p = threadIdx.x; p < hidden / kVec; p += kThreads) {
    const Vec xv = xr[p], g = dyr[p], wv = w[p];
#pragma unroll
    for (int j = 0; j < kVec; ++j) dot += g.v[j] * wv.v[j] * (xv.v[j] * rstd);
  }
  dot = typename Row::Reduce(storage.reduce).Sum(dot);
  if (threadIdx.x == 0) mean_shared = dot / float(hidden);
  __syncthreads();
  const float mean = mean_shared;
  for (int p = threadIdx.x; p < hidden / kVec; p += kThreads) {
    const Vec xv = xr[p], g = dyr[p], wv = w[p];
    Vec d = dxr[p];
#pragma unroll
    for (int j = 0; j < kVec; ++j) d.v[j] += rstd * (g.v[j] * wv.v[j] - xv.v[j] * rstd * mean);
    dxr[p] = d;
  }
}

template <int kVec>
void launch(__nv_bfloat16* out, const float* x, const float* weight, const int32_t* rows, int n, int hidden,
            float eps, cudaStream_t stream) {
  with_rmsnorm_threads(hidden / kVec, [&]<int kThreads>() {
    launch_kernel(rmsnorm_kernel<kThreads, kVec>, {.grid = dim3(n), .block = kThreads}, stream, out, x, weight, rows,
                  hidden, eps);
  });
}

template <int kVec>
void launch_backward(float* dx, const float* dy, const float* x, const float* weight, int n, int hidden, float eps,
                     cudaStream_t stream) {
  with_rmsnorm_threads(hidden / kVec, [&]<int kThreads>() {
    rmsnorm_backward_kernel<kThreads, kVec><<<n, kThreads, 0, stream>>>(dx, dy, x, weight, hidden, eps);
  });
}

}  // namespace

void rmsnorm_forward(__nv_bfloat16* out, const float* x, const float* weight, const int32_t* rows, int n,
                     int hidden, float eps, cudaStream_t stream) {
  if (n == 0) return;
  constexpr int kWide = 4;
  if (hidden % kWide == 0 && aligned(x, sizeof(Pack<float, kWide>)) && aligned(weight, sizeof(Pack<float, kWide>)) &&
      aligned(out, sizeof(Pack<__nv_bfloat16, kWide>))) {
    launch<kWide>(out, x, weight, rows, n, hidden, eps, stream);
  } else {
    launch<1>(out, x, weight, rows, n, hidden, eps, stream);
  }
  OSSRL_CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward(float* dx, const float* dy, const float* x, const float* weight, int n, int hidden, float eps,
                      cudaStream_t stream) {
  if (n == 0) return;
  constexpr int kWide = 4;
  const size_t wide = sizeof(Pack<float, kWide>);
  if (hidden % kWide == 0 && aligned(dx, wide) && aligned(dy, wide) && aligned(x, wide) && aligned(weight, wide)) {
    launch_backward<kWide>(dx, dy, x, weight, n, hidden, eps, stream);
  } else {
    launch_backward<1>(dx, dy, x, weight, n, hidden, eps, stream);
  }
  OSSRL_CUDA_CHECK_LAUNCH();
}

}  // namespace ossrl::cuda
