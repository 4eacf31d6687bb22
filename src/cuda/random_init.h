// Random weights written straight into GPU memory, so a model of the 20b or 120b shape can be
// benchmarked with no checkpoint and no host copy (engine/cuda_model.h's CudaModel::random).
// Counter-based: element i of a fill is a hash of (seed, i), so a seed names the same values
// whatever the launch shape or GPU.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

// dst[i] = mean + stddev * u_i, u_i uniform on [-√3, √3) (unit variance): the scale of
// model/random_checkpoint.cpp's Gaussian N(mean, stddev²) entries.
void random_uniform_bf16(__nv_bfloat16* dst, size_t n, float mean, float stddev, uint64_t seed,
                         cudaStream_t stream);
void random_uniform_f32(float* dst, size_t n, float mean, float stddev, uint64_t seed, cudaStream_t stream);

// n_blocks MXFP4 blocks whose values have a standard deviation of about `stddev`, as
// model/random_checkpoint.cpp writes them: blocks [n_blocks, 16] uniform random bytes (two E2M1
// codes each, rms 2.93), scales [n_blocks] E8M0 = 127 + round(log2(stddev / 2.93)) minus a
// random 0 or 1, so block magnitudes vary by a factor of two.
void random_mxfp4(uint8_t* blocks, uint8_t* scales, size_t n_blocks, float stddev, uint64_t seed,
                  cudaStream_t stream);

}  // namespace ossrl::cuda
