// The per-row RMSNorm of rmsnorm_forward as device code, for kernels that norm rows themselves
// and must produce its output bit for bit (the fused MoE routing in cuda/router.cu): the same
// CTA size, access width and reduction tree give the same sum of squares, hence the same bf16.
#pragma once

#include <cstdint>

#include <cub/block/block_reduce.cuh>
#include <cuda_bf16.h>

namespace ossrl::cuda {

template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// The CTA size rmsnorm_forward gives a row of `packs` accesses: a single warp for small rows
// (the tests' and tiny models'), 256 threads for the real hidden sizes (2880 = 720 float4s).
constexpr int rmsnorm_threads(int packs) { return packs <= 64 ? 32 : packs <= 256 ? 128 : 256; }

// Calls launch.template operator()<rmsnorm_threads(packs)>(): the CTA size as a template
// argument, for kernels templated on it.
template <class Launch>
void with_rmsnorm_threads(int packs, Launch&& launch) {
  switch (rmsnorm_threads(packs)) {
    case 32: launch.template operator()<32>(); break;
    case 128: launch.template operator()<128>(); break;
    default: launch.template operator()<256>(); break;
  }
}

// One row's norm by a CTA of kThreads, kVec elements per access; thread i handles packs
// i, i + kThreads, ... of the row.
template <int kThreads, int kVec>
struct RmsnormRow {
  using Reduce = cub::BlockReduce<float, kThreads>;
  struct Storage {
    typename Reduce::TempStorage reduce;
    float rstd;
  };

  // 1 / sqrt(mean(x^2) + eps) of the row x [hidden] fp32, returned to every thread; all the
  // CTA's threads call it. A Storage is used once per row (or after a __syncthreads).
  static __device__ float rstd(const float* x, int hidden, float eps, Storage& storage) {
    const auto* xr = reinterpret_cast<const Pack<float, kVec>*>(x);
    float sum_sq = 0.0f;
    for (int p = threadIdx.x; p < hidden / kVec; p += kThreads) {
      const Pack<float, kVec> v = xr[p];
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum_sq += v.v[j] * v.v[j];
    }
    sum_sq = Reduce(storage.reduce).Sum(sum_sq);
    // 1 / sqrt rather than rsqrtf: both correctly rounded, as the CPU reference computes it.
    if (threadIdx.x == 0) storage.rstd = 1.0f / sqrtf(sum_sq / float(hidden) + eps);
    __syncthreads();
    return storage.rstd;
  }

  // Pack p of the normed row: weight * (x * rstd), in that order, as transformers rounds it.
  static __device__ Pack<__nv_bfloat16, kVec> scale(const float* x, const float* weight, int p, float rstd) {
    const Pack<float, kVec> v = reinterpret_cast<const Pack<float, kVec>*>(x)[p];
    const Pack<float, kVec> g = reinterpret_cast<const Pack<float, kVec>*>(weight)[p];
    Pack<__nv_bfloat16, kVec> y;
#pragma unroll
    for (int j = 0; j < kVec; ++j) y.v[j] = __float2bfloat16_rn(g.v[j] * (v.v[j] * rstd));
    return y;
  }
};

}  // namespace ossrl::cuda
