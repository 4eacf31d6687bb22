// AdamW over one flat fp32 buffer, the gradient's sum of squares for clipping, and the bf16
// refresh of the values. Elementwise kernels are grid-stride loops: the buffers hold up to
// hundreds of millions of values and every pass is bound by memory bandwidth.
#include "cuda/adamw.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <cub/block/block_reduce.cuh>

#include "cuda/check.h"

namespace ossrl::cuda {
namespace {

constexpr int kThreads = 256;
// Enough CTAs of kThreads to fill an H100 (132 SMs x 8) for the elementwise passes.
constexpr int64_t kMaxElementwiseBlocks = 132 * 8;

int elementwise_blocks(size_t n) {
  return int(std::min<int64_t>(kMaxElementwiseBlocks, (int64_t(n) + kThreads - 1) / kThreads));
}

// Pass 1: partials [gridDim.x] fp64, CTA b's = Σ grad[i]² over i ≡ (b * kThreads + thread) mod
// (gridDim.x * kThreads), each thread in index order, then a fixed block tree. grad [n] fp32.
__global__ void __launch_bounds__(kThreads) sum_of_squares_partials(double* partials, const float* grad, size_t n) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  double sum = 0.0;
  const size_t stride = size_t(gridDim.x) * kThreads;
  for (size_t i = size_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const double g = grad[i];
    sum += g * g;  // exact: a float's square fits in a double's mantissa
  }
  sum = Reduce(storage).Sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// Pass 2, one CTA: out[0] = the partials [count] fp64 summed in a fixed tree.
__global__ void __launch_bounds__(kThreads) sum_partials(double* out, const double* partials, int count) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  double sum = 0.0;
  for (int i = threadIdx.x; i < count; i += kThreads) sum += partials[i];
  sum = Reduce(storage).Sum(sum);
  if (threadIdx.x == 0) out[0] = sum;
}

// param, exp_avg, exp_avg_sq [n] fp32 updated in place from grad [n] fp32; each operation
// rounded on its own (the __f*_rn intrinsics are never contracted into fused multiply-adds)
// in AdamW::update's order, so every value is the CPU's.
__global__ void __launch_bounds__(kThreads) adamw_kernel(float* param, float* exp_avg, float* exp_avg_sq,
                                                         const float* grad, size_t n, AdamWStep s) {
  const size_t stride = size_t(gridDim.x) * kThreads;
  for (size_t i = size_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const float g = __fmul_rn(grad[i], s.grad_scale);
    const float w = __fmul_rn(param[i], s.decay);
    const float m = __fadd_rn(exp_avg[i], __fmul_rn(s.one_minus_b1, __fsub_rn(g, exp_avg[i])));
    const float v = __fadd_rn(__fmul_rn(exp_avg_sq[i], s.b2), __fmul_rn(__fmul_rn(s.one_minus_b2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
    param[i] = __fadd_rn(w, __fdiv_rn(__fmul_rn(-s.step_size, m), denom));
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

// core/dtype.h's f32_to_bf16 on the device: NaN keeps its sign and top payload bits and is
// made quiet; everything else (subnormals and infinities included) rounds to nearest even.
__device__ uint16_t bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__global__ void __launch_bounds__(kThreads) to_bf16_kernel(uint16_t* dst, const float* src, size_t n) {
  const size_t stride = size_t(gridDim.x) * kThreads;
  for (size_t i = size_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) dst[i] = bf16_bits(src[i]);
}

}  // namespace

void sum_of_squares(double* out, double* partials, const float* grad, size_t n, cudaStream_t stream) {
  // A fixed grid whatever n: the partition of the values, hence the order of the sums, is a
  // function of n alone.
  sum_of_squares_partials<<<kSumOfSquaresPartials, kThreads, 0, stream>>>(partials, grad, n);
  OSSRL_CUDA_CHECK_LAUNCH();
  sum_partials<<<1, kThreads, 0, stream>>>(out, partials, kSumOfSquaresPartials);
  OSSRL_CUDA_CHECK_LAUNCH();
}

AdamWStep adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                        float grad_scale) {
  const double t = double(step);
  const double bias_correction1 = 1.0 - std::pow(beta1, t);
  const double bias_correction2 = 1.0 - std::pow(beta2, t);
  AdamWStep s;
  s.step_size = float(lr / bias_correction1);
  s.bc2_sqrt = float(std::sqrt(bias_correction2));
  s.decay = float(1.0 - lr * weight_decay);
  s.one_minus_b1 = float(1.0 - beta1);
  s.b2 = float(beta2);
  s.one_minus_b2 = float(1.0 - beta2);
  s.eps = float(eps);
  s.grad_scale = grad_scale;
  return s;
}

void adamw_step(float* param, float* exp_avg, float* exp_avg_sq, const float* grad, size_t n, const AdamWStep& s,
                cudaStream_t stream) {
  if (n == 0) return;
  adamw_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(param, exp_avg, exp_avg_sq, grad, n, s);
  OSSRL_CUDA_CHECK_LAUNCH();
}

void to_bf16(__nv_bfloat16* dst, const float* src, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  to_bf16_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(reinterpret_cast<uint16_t*>(dst), src, n);
  OSSRL_CUDA_CHECK_LAUNCH();
}

}  // namespace ossrl::cuda
