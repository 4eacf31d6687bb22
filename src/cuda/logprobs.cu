// The passes of LmHeadLogprobs over one block of logits: the online log-sum-exp (with the
// target's logit and the entropy's sum) and the logits' gradient in bf16. One CTA per row of the
// block, one read of each logit: both are bound by memory bandwidth, next to GEMMs that are not.
#include "cuda/logprobs_kernels.h"

#include <cstdint>

#include <cub/block/block_reduce.cuh>

#include "cuda/check.h"

namespace ossrl::cuda {
namespace {

constexpr int kThreads = 256;
// float4 loads a thread issues before using the first: rows are read once, so the loads in
// flight are what covers the memory latency.
constexpr int kUnroll = 4;
constexpr float kInf = __builtin_huge_valf();

// Part of a row's softmax statistics (LseState's max, sum and weighted, about `max`).
struct Online {
  float max = -kInf;
  float sum = 0.0f;
  float weighted = 0.0f;

  // Re-expressed about a max m >= max: Σ e·α and Σ e·α·(z - m) = α·(weighted + (max - m)·sum),
  // α = exp(max - m). Nothing seen yet (max -inf): stays empty rather than 0 · inf = NaN.
  __device__ void rescale(float m) {
    if (max != -kInf) {
      const float shift = max - m;
      const float alpha = expf(shift);
      weighted = alpha * (weighted + shift * sum);
      sum *= alpha;
    }
    max = m;
  }
  // Adds logit z, z <= max.
  __device__ void add(float z) {
    const float d = z - max;
    const float e = expf(d);
    sum += e;
    weighted += e * d;
  }
  __device__ void add(float4 z) {
    const float m = fmaxf(fmaxf(z.x, z.y), fmaxf(z.z, z.w));
    if (m > max) rescale(m);
    add(z.x), add(z.y), add(z.z), add(z.w);
  }
  __device__ void add_one(float z) {
    if (z > max) rescale(z);
    add(z);
  }
};

// Two parts of a row about their common max.
struct Merge {
  __device__ Online operator()(Online a, Online b) const {
    const float m = fmaxf(a.max, b.max);
    a.rescale(m);
    b.rescale(m);
    a.sum += b.sum;
    a.weighted += b.weighted;
    return a;
  }
};

// This thread's logits of a row [width] (16-byte aligned) in a fixed order: float4 p = thread +
// kThreads · k, then the width % 4 tail one at a time.
template <class Vector, class Scalar>
__device__ void for_each_logit(const float* row, int width, Vector vector, Scalar scalar) {
  const auto* row4 = reinterpret_cast<const float4*>(row);
  const int packs = width / 4;
  for (int p0 = threadIdx.x; p0 < packs; p0 += kThreads * kUnroll) {
    float4 z[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int p = p0 + k * kThreads;
      if (p < packs) z[k] = row4[p];
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int p = p0 + k * kThreads;
      if (p < packs) vector(p, z[k]);
    }
  }
  for (int v = packs * 4 + threadIdx.x; v < width; v += kThreads) scalar(v, row[v]);
}

// One CTA per row of the block (see fold_logits).
__global__ void __launch_bounds__(kThreads) fold_kernel(LseState* state, LogitsBlock block, bool first_chunk,
                                                        bool last_chunk, float* logp, float* lse, float* entropy) {
  using Reduce = cub::BlockReduce<Online, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const int r = blockIdx.x;
  const float* row = block.logits + int64_t(r) * block.ld;
  Online part;
  for_each_logit(
      row, block.width, [&](int, float4 z) { part.add(z); }, [&](int, float z) { part.add_one(z); });
  part = Reduce(storage).Reduce(part, Merge());
  if (threadIdx.x != 0) return;

  // NaN until the chunk holding the target is seen: a target outside the vocabulary shows.
  float target = __int_as_float(0x7fc00000);
  if (!first_chunk) {
    const LseState before = state[r];
    part = Merge()(Online{before.max, before.sum, before.weighted}, part);
    target = before.target;
  }
  const int32_t column = block.targets[r] - block.v0;
  if (column >= 0 && column < block.width) target = row[column];
  if (!last_chunk) {
    state[r] = LseState{part.max, part.sum, part.weighted, target};
    return;
  }
  const float log_sum = logf(part.sum);
  const float row_lse = part.max + log_sum;
  logp[r] = target - row_lse;
  if (lse) lse[r] = row_lse;
  if (entropy) entropy[r] = log_sum - part.weighted / part.sum;
}

// One CTA per row of the block (see logits_gradient).
__global__ void __launch_bounds__(kThreads) gradient_kernel(__nv_bfloat16* dlogits, LogitsBlock block,
                                                            const float* dlogp, const float* lse) {
  const int r = blockIdx.x;
  const float g = dlogp[r];
  const float row_lse = lse[r];
  const int target = block.targets[r] - block.v0;
  // model/cpu/lm_head.cpp's order: -g · exp(z - lse), then + g at the target.
  const auto grad = [&](int v, float z) {
    const float d = -g * expf(z - row_lse);
    return v == target ? d + g : d;
  };
  __nv_bfloat16* out = dlogits + int64_t(r) * block.ld;
  for_each_logit(
      block.logits + int64_t(r) * block.ld, block.width,
      [&](int p, float4 z) {
        const int v = 4 * p;
        // 8-byte store: ld is a multiple of 4, so every pack of 4 bf16 is 8-byte aligned.
        __nv_bfloat162 pair[2] = {__floats2bfloat162_rn(grad(v, z.x), grad(v + 1, z.y)),
                                  __floats2bfloat162_rn(grad(v + 2, z.z), grad(v + 3, z.w))};
        *reinterpret_cast<uint2*>(out + v) = *reinterpret_cast<const uint2*>(pair);
      },
      [&](int v, float z) { out[v] = __float2bfloat16_rn(grad(v, z)); });
}

}  // namespace

void fold_logits(LseState* state, const LogitsBlock& block, bool first_chunk, bool last_chunk, float* logp, float* lse,
                 float* entropy, cudaStream_t stream) {
  if (block.rows == 0) return;
  fold_kernel<<<block.rows, kThreads, 0, stream>>>(state, block, first_chunk, last_chunk, logp, lse, entropy);
  OSSRL_CUDA_CHECK_LAUNCH();
}

void logits_gradient(__nv_bfloat16* dlogits, const LogitsBlock& block, const float* dlogp, const float* lse,
                     cudaStream_t stream) {
  if (block.rows == 0) return;
  gradient_kernel<<<block.rows, kThreads, 0, stream>>>(dlogits, block, dlogp, lse);
  OSSRL_CUDA_CHECK_LAUNCH();
}

}  // namespace ossrl::cuda
