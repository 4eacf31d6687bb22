#include "cuda/random_init.h"

#include <cmath>

#include "cuda/check.h"

namespace ossrl::cuda {

namespace {

// SplitMix64's finaliser: a bijection on 64 bits whose output bits each depend on every input bit.
__device__ uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Draw `stream` of element i under `seed`: streams let one element take several draws.
__device__ uint64_t draw(uint64_t seed, uint64_t i, uint64_t stream) { return mix64(mix64(seed ^ stream) + i); }

// mean + stddev * (uniform on [-√3, √3)), from the top 24 bits of a draw.
__device__ float uniform_value(uint64_t bits, float mean, float stddev) {
  const float u = float(bits >> 40) * 0x1.0p-24f;  // [0, 1)
  return mean + stddev * 1.7320508f * (2.0f * u - 1.0f);
}

struct UniformBf16 {
  __nv_bfloat16* dst;
  float mean, stddev;
  uint64_t seed;
  __device__ void operator()(uint64_t i) const { dst[i] = __float2bfloat16(uniform_value(draw(seed, i, 0), mean, stddev)); }
};

struct UniformF32 {
  float* dst;
  float mean, stddev;
  uint64_t seed;
  __device__ void operator()(uint64_t i) const { dst[i] = uniform_value(draw(seed, i, 0), mean, stddev); }
};

// Block i: 16 code bytes from two draws (one 16-byte store: cudaMalloc'd blocks are 16-byte
// aligned and each block is 16 bytes), its scale from a third.
struct Mxfp4Blocks {
  uint8_t* blocks;
  uint8_t* scales;
  int scale_base;
  uint64_t seed;
  __device__ void operator()(uint64_t i) const {
    const uint64_t lo = draw(seed, i, 0), hi = draw(seed, i, 1);
    reinterpret_cast<uint4*>(blocks)[i] = make_uint4(uint32_t(lo), uint32_t(lo >> 32), uint32_t(hi), uint32_t(hi >> 32));
    scales[i] = uint8_t(scale_base - int(draw(seed, i, 2) >> 63));
  }
};

// Element functor `fill` over [0, n), grid-stride.
template <class Fill>
__global__ void fill_kernel(uint64_t n, Fill fill) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += uint64_t(gridDim.x) * blockDim.x) {
    fill(i);
  }
}

template <class Fill>
void launch_fill(uint64_t n, const Fill& fill, cudaStream_t stream) {
  if (n == 0) return;
  constexpr int kThreads = 256;
  const uint64_t blocks = (n + kThreads - 1) / kThreads;
  // Enough blocks to fill every SM many times over; the grid-stride loop covers the rest.
  fill_kernel<<<unsigned(blocks < 16384 ? blocks : 16384), kThreads, 0, stream>>>(n, fill);
  OSSRL_CUDA_CHECK_LAUNCH();
}

}  // namespace

void random_uniform_bf16(__nv_bfloat16* dst, size_t n, float mean, float stddev, uint64_t seed,
                         cudaStream_t stream) {
  launch_fill(n, UniformBf16{dst, mean, stddev, seed}, stream);
}

void random_uniform_f32(float* dst, size_t n, float mean, float stddev, uint64_t seed, cudaStream_t stream) {
  launch_fill(n, UniformF32{dst, mean, stddev, seed}, stream);
}

void random_mxfp4(uint8_t* blocks, uint8_t* scales, size_t n_blocks, float stddev, uint64_t seed,
                  cudaStream_t stream) {
  // 2.93: the rms of the 16 E2M1 values (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6) drawn uniformly.
  const int exponent = int(std::lround(std::log2(stddev / 2.93f)));
  launch_fill(n_blocks, Mxfp4Blocks{blocks, scales, 127 + exponent, seed}, stream);
}

}  // namespace ossrl::cuda
