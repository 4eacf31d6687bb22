// Kernels of the MoE training block (cuda/moe_train_kernels.h). The expert GEMMs themselves are
// cuBLAS's (moe_train.cpp); these are what surrounds them: the row gather, the MXFP4 decode
// into the stage buffer, the LoRA matmuls and the epilogues that read each GEMM's fp32 output
// once (bias, the adapter's rank-r update, SwiGLU or its backward, the scatter back to
// assignment order).
//
// The LoRA matmuls use WMMA (16x16x16 bf16 fragments, fp32 accumulation) on tiles of 64 rows
// of one expert: the rows a CTA takes never straddle two experts, so the adapter factor it
// stages is one expert's. A CTA is 4 warps, warp w owning tile rows 16w .. 16w+15.
#include "cuda/moe_train_kernels.h"

#include <mma.h>

#include <algorithm>
#include <cstdint>

#include "cuda/check.h"

namespace ossrl::cuda::moe_train {
namespace {

using bf16 = __nv_bfloat16;
namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;
constexpr int kTileRows = 64;  // rows of one expert per CTA
constexpr int kTileCols = 64;  // features per CTA
constexpr int kMaxRankTile = 64;
constexpr float kSwiGluAlpha = 1.702f;

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragACol = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// The rank tile for rank r: the smallest of 16, 32, 64 that holds it (larger r: chunks of 64).
template <class F>
void with_rank_tile(int r, F f) {
  if (r <= 16) {
    f.template operator()<16>();
  } else if (r <= 32) {
    f.template operator()<32>();
  } else {
    f.template operator()<kMaxRankTile>();
  }
}

unsigned ceil_div(int64_t a, int64_t b) { return unsigned((a + b - 1) / b); }

// Row tile `tile` of expert e: rows [begin, begin + count); count <= 0 when the expert has fewer tiles.
struct RowTile {
  int begin, count;
};
__device__ __forceinline__ RowTile row_tile(const int32_t* offsets, int expert, int tile) {
  const int begin = offsets[expert] + tile * kTileRows;
  return {begin, min(kTileRows, offsets[expert + 1] - begin)};
}

template <class T>
__device__ __forceinline__ T operand_at(const RankOperand<T>& m, int e, int64_t c, int64_t q) {
  return m.data[e * m.stride_e + c * m.stride_c + q * m.stride_q];
}

// dst[c][q] (row stride ld) = l_e(c0 + c, q0 + q) for c < kCols, q < kRank, zero outside
// (features >= width or rank >= r). The loop runs along whichever index is contiguous in memory.
template <int kCols, int kRank>
__device__ __forceinline__ void stage_rank_operand(bf16* dst, int ld, const RankOperand<const bf16>& m, int e, int c0,
                                                   int width, int q0, int r) {
  const bf16 zero = __float2bfloat16_rn(0.0f);
  const bool q_contiguous = m.stride_q == 1;
  for (int i = threadIdx.x; i < kCols * kRank; i += kThreads) {
    const int c = q_contiguous ? i / kRank : i % kCols;
    const int q = q_contiguous ? i % kRank : i / kCols;
    dst[c * ld + q] = c0 + c < width && q0 + q < r ? operand_at(m, e, c0 + c, q0 + q) : zero;
  }
}

// ---- gather

// One thread per 16-byte chunk of a row.
__global__ void gather_rows_kernel(bf16* xs, int32_t* position, const bf16* xn, const int32_t* sorted, int rows, int k,
                                   int hidden) {
  const int chunks = hidden / 8;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(rows) * chunks) return;
  const int j = int(i / chunks), c = int(i % chunks) * 8;
  const int a = sorted[j];
  if (c == 0) position[a] = j;
  *reinterpret_cast<uint4*>(xs + int64_t(j) * hidden + c) =
      *reinterpret_cast<const uint4*>(xn + int64_t(a / k) * hidden + c);
}

// ---- MXFP4 decode

// E2M1 code -> value, as io/mxfp4's kFp4Values.
__device__ __forceinline__ float fp4_value(int code) {
  constexpr float kMagnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  return code & 8 ? -kMagnitude[code & 7] : kMagnitude[code & 7];
}

// One thread per 32-value block: 16 bytes of codes and one scale in, 64 bytes of bf16 out.
// value = (fp4 * pre) * 2^(scale - 127) in fp32 with the multiplier built from its bits, as
// io/mxfp4 computes it: scale 0 is the subnormal 2^-127 (kernels here keep subnormals), scale
// 255 is 2 * 2^127 so ±0.5 stays finite and zero codes stay zero. Every finite result has at
// most two significant bits, so the bf16 rounding is exact: bit for bit io/mxfp4's decode.
__global__ void decode_mxfp4_kernel(bf16* stage, const uint8_t* blocks, const uint8_t* scales,
                                    int64_t blocks_per_expert, StageList list) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = fp4_value(int(threadIdx.x));
  __syncthreads();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= blocks_per_expert) return;
  const int64_t src = int64_t(list.expert[blockIdx.y]) * blocks_per_expert + i;
  const uint4 codes = *reinterpret_cast<const uint4*>(blocks + src * 16);
  const uint32_t scale = scales[src];
  const float multiplier = __uint_as_float(scale == 0 ? 0x00400000u : (scale == 255 ? 254u : scale) << 23);
  const float pre = scale == 255 ? 2.0f : 1.0f;
  const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
  uint32_t pairs[16];
#pragma unroll
  for (int b = 0; b < 16; ++b) {
    const uint32_t byte = words[b / 4] >> (8 * (b % 4)) & 0xffu;
    // Low nibble: the even element.
    const __nv_bfloat162 pair =
        __floats2bfloat162_rn((table[byte & 15] * pre) * multiplier, (table[byte >> 4] * pre) * multiplier);
    pairs[b] = *reinterpret_cast<const uint32_t*>(&pair);
  }
  uint4* dst = reinterpret_cast<uint4*>(stage + (int64_t(blockIdx.y) * blocks_per_expert + i) * 32);
#pragma unroll
  for (int v = 0; v < 4; ++v) dst[v] = make_uint4(pairs[4 * v], pairs[4 * v + 1], pairs[4 * v + 2], pairs[4 * v + 3]);
}

// ---- LoRA projection: u = alpha · x · m_e

// grid (row tiles, experts, rank tiles). K advances 64 per stage; x tile [64 rows][64] and
// m tile [kRank][64] (B = m as col-major k x q) in shared memory.
template <int kRank>
__global__ void __launch_bounds__(kThreads) lora_project_kernel(bf16* u, const bf16* x, int K,
                                                                RankOperand<const bf16> m, int r, float alpha,
                                                                const int32_t* offsets) {
  constexpr int kStep = 64;
  constexpr int kLd = kStep + 8;  // bf16; padding staggers the rows across banks
  constexpr int kLdOut = kRank + 4;
  __shared__ alignas(128) bf16 xs[kTileRows * kLd];
  __shared__ alignas(128) bf16 ms[kRank * kLd];
  __shared__ alignas(128) float out[kTileRows * kLdOut];
  const int e = blockIdx.y, q0 = blockIdx.z * kRank;
  const RowTile tile = row_tile(offsets, e, blockIdx.x);
  if (tile.count <= 0) return;
  const int warp = threadIdx.x / 32;

  FragC acc[kRank / 16];
#pragma unroll
  for (int f = 0; f < kRank / 16; ++f) wmma::fill_fragment(acc[f], 0.0f);
  for (int k0 = 0; k0 < K; k0 += kStep) {
    for (int i = threadIdx.x; i < kTileRows * kStep / 8; i += kThreads) {
      const int row = i / (kStep / 8), c = i % (kStep / 8) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (row < tile.count && k0 + c < K) v = *reinterpret_cast<const uint4*>(x + int64_t(tile.begin + row) * K + k0 + c);
      *reinterpret_cast<uint4*>(xs + row * kLd + c) = v;
    }
    // ms[q][c] = m_e(k0 + c, q0 + q): m with its two indices swapped, staged as [rank][K].
    stage_rank_operand<kRank, kStep>(ms, kLd, RankOperand<const bf16>{m.data, m.stride_e, m.stride_q, m.stride_c}, e,
                                     q0, r, k0, K);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; kk += 16) {
      FragA a;
      wmma::load_matrix_sync(a, xs + warp * 16 * kLd + kk, kLd);
#pragma unroll
      for (int f = 0; f < kRank / 16; ++f) {
        FragBCol b;
        wmma::load_matrix_sync(b, ms + f * 16 * kLd + kk, kLd);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < kRank / 16; ++f) {
    wmma::store_matrix_sync(out + warp * 16 * kLdOut + f * 16, acc[f], kLdOut, wmma::mem_row_major);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTileRows * kRank; i += kThreads) {
    const int row = i / kRank, q = i % kRank;
    if (row < tile.count && q0 + q < r) {
      u[int64_t(tile.begin + row) * r + q0 + q] = __float2bfloat16_rn(alpha * out[row * kLdOut + q]);
    }
  }
}

// ---- LoRA weight grads: grad_e(c, q) += alpha Σ_j p[j, c] q[j, q]

// grid (feature tiles, experts, rank tiles); the CTA walks all of its expert's rows, 32 a stage:
// p chunk [32 rows][64 features] (A = pᵀ, col-major) and q chunk [32 rows][kRank] (B, row-major).
template <int kRank>
__global__ void __launch_bounds__(kThreads) lora_weight_grad_kernel(RankOperand<float> grad, const bf16* p, int width,
                                                                    const bf16* q, int r, float alpha,
                                                                    const int32_t* offsets) {
  constexpr int kStep = 32;
  constexpr int kLdP = kTileCols + 8;
  constexpr int kLdQ = kRank + 8;
  constexpr int kLdOut = kRank + 4;
  __shared__ alignas(128) bf16 ps[kStep * kLdP];
  __shared__ alignas(128) bf16 qs[kStep * kLdQ];
  __shared__ alignas(128) float out[kTileCols * kLdOut];
  const int e = blockIdx.y, c0 = blockIdx.x * kTileCols, q0 = blockIdx.z * kRank;
  const int begin = offsets[e], end = offsets[e + 1];
  if (begin == end) return;
  const int warp = threadIdx.x / 32;
  const bf16 zero = __float2bfloat16_rn(0.0f);

  FragC acc[kRank / 16];
#pragma unroll
  for (int f = 0; f < kRank / 16; ++f) wmma::fill_fragment(acc[f], 0.0f);
  for (int j0 = begin; j0 < end; j0 += kStep) {
    for (int i = threadIdx.x; i < kStep * kTileCols / 8; i += kThreads) {
      const int row = i / (kTileCols / 8), c = i % (kTileCols / 8) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (j0 + row < end && c0 + c < width) v = *reinterpret_cast<const uint4*>(p + int64_t(j0 + row) * width + c0 + c);
      *reinterpret_cast<uint4*>(ps + row * kLdP + c) = v;
    }
    for (int i = threadIdx.x; i < kStep * kRank; i += kThreads) {
      const int row = i / kRank, c = i % kRank;
      qs[row * kLdQ + c] = j0 + row < end && q0 + c < r ? q[int64_t(j0 + row) * r + q0 + c] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; kk += 16) {
      FragACol a;
      wmma::load_matrix_sync(a, ps + kk * kLdP + warp * 16, kLdP);
#pragma unroll
      for (int f = 0; f < kRank / 16; ++f) {
        FragBRow b;
        wmma::load_matrix_sync(b, qs + kk * kLdQ + f * 16, kLdQ);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < kRank / 16; ++f) {
    wmma::store_matrix_sync(out + warp * 16 * kLdOut + f * 16, acc[f], kLdOut, wmma::mem_row_major);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTileCols * kRank; i += kThreads) {
    const int c = i / kRank, qq = i % kRank;
    if (c0 + c < width && q0 + qq < r) {
      grad.data[e * grad.stride_e + int64_t(c0 + c) * grad.stride_c + int64_t(q0 + qq) * grad.stride_q] +=
          alpha * out[c * kLdOut + qq];
    }
  }
}

// ---- SwiGLU, forward and backward, as model/cpu/moe.cpp

__device__ __forceinline__ float swiglu(float gate_in, float up_in, float limit) {
  const float gate = fminf(gate_in, limit);
  const float up = fminf(fmaxf(up_in, -limit), limit);
  const float glu = gate * (1.0f / (1.0f + expf(-gate * kSwiGluAlpha)));
  return (up + 1.0f) * glu;
}

// (dgate, dup) given dh; torch.clamp's backward passes the gradient where min <= x <= max.
__device__ __forceinline__ float2 swiglu_backward(float dh, float gate_in, float up_in, float limit) {
  const float gate = fminf(gate_in, limit);
  const float up = fminf(fmaxf(up_in, -limit), limit);
  const float sig = 1.0f / (1.0f + expf(-gate * kSwiGluAlpha));
  const float glu = gate * sig;
  const float dgate = gate_in <= limit ? dh * (up + 1.0f) * (sig + gate * kSwiGluAlpha * sig * (1.0f - sig)) : 0.0f;
  const float dup = up_in >= -limit && up_in <= limit ? dh * glu : 0.0f;
  return make_float2(dgate, dup);
}

// bf16 of v >= 0 on the same side of `bound` as v (v <= bound, or v > bound): a value the
// forward clamped stays clamped for backward's mask and one it let through stays through.
__device__ __forceinline__ bf16 round_keeping_side(float v, float bound) {
  const bf16 nearest = __float2bfloat16_rn(v);
  const float rounded = __bfloat162float(nearest);
  if (v <= bound && rounded > bound) return __float2bfloat16_rd(v);
  if (v > bound && rounded <= bound) return __float2bfloat16_ru(v);
  return nearest;
}
// gate meets the bound +L only; up meets ±L, and rounding is symmetric in the sign.
__device__ __forceinline__ bf16 encode_gate(float v, float limit) { return round_keeping_side(v, limit); }
__device__ __forceinline__ bf16 encode_up(float v, float limit) {
  return v < 0.0f ? __hneg(round_keeping_side(-v, limit)) : round_keeping_side(v, limit);
}

// ---- epilogues

// What an epilogue does with its finished fp32 tile [kTileRows][ld] (rows tile.begin.., features c0..).
struct GateUpFinish {
  bf16* g;
  bf16* h;
  const float* bias;  // [experts, 2I]
  int intermediate;
  float limit;
  __device__ void operator()(const float* tile, int ld, RowTile rows, int c0, int e) const {
    const int width = 2 * intermediate;
    for (int i = threadIdx.x; i < kTileRows * kTileCols / 2; i += kThreads) {
      const int row = i / (kTileCols / 2), pair = i % (kTileCols / 2), c = c0 + 2 * pair;
      if (row >= rows.count || c >= width) continue;
      const float gate_in = tile[row * ld + 2 * pair] + bias[int64_t(e) * width + c];
      const float up_in = tile[row * ld + 2 * pair + 1] + bias[int64_t(e) * width + c + 1];
      const int64_t j = rows.begin + row;
      __nv_bfloat162 stored;
      stored.x = encode_gate(gate_in, limit);
      stored.y = encode_up(up_in, limit);
      *reinterpret_cast<__nv_bfloat162*>(g + j * width + c) = stored;
      h[j * intermediate + c / 2] = __float2bfloat16_rn(swiglu(gate_in, up_in, limit));
    }
  }
};

struct StoreRowsFinish {
  float* out;
  int width;
  const float* bias;        // [experts, width] or null
  const int32_t* row_map;   // destination row of each row, or null
  __device__ void operator()(const float* tile, int ld, RowTile rows, int c0, int e) const {
    for (int i = threadIdx.x; i < kTileRows * kTileCols / 4; i += kThreads) {
      const int row = i / (kTileCols / 4), c = i % (kTileCols / 4) * 4;
      if (row >= rows.count || c0 + c >= width) continue;
      float4 v = *reinterpret_cast<const float4*>(tile + row * ld + c);
      if (bias != nullptr) {
        const float4 b = *reinterpret_cast<const float4*>(bias + int64_t(e) * width + c0 + c);
        v.x += b.x, v.y += b.y, v.z += b.z, v.w += b.w;
      }
      const int64_t j = rows.begin + row;
      const int64_t dst = row_map != nullptr ? row_map[j] : j;
      *reinterpret_cast<float4*>(out + dst * width + c0 + c) = v;
    }
  }
};

struct SwigluBackwardFinish {
  bf16* dg;
  const bf16* g;
  int intermediate;
  float limit;
  __device__ void operator()(const float* tile, int ld, RowTile rows, int c0, int) const {
    const int64_t width = 2 * int64_t(intermediate);
    for (int i = threadIdx.x; i < kTileRows * kTileCols; i += kThreads) {
      const int row = i / kTileCols, c = i % kTileCols;
      if (row >= rows.count || c0 + c >= intermediate) continue;
      const int64_t at = (rows.begin + row) * width + 2 * (c0 + c);
      const __nv_bfloat162 gate_up = *reinterpret_cast<const __nv_bfloat162*>(g + at);
      const float2 d = swiglu_backward(tile[row * ld + c], __bfloat162float(gate_up.x), __bfloat162float(gate_up.y), limit);
      *reinterpret_cast<__nv_bfloat162*>(dg + at) = __floats2bfloat162_rn(d.x, d.y);
    }
  }
};

// grid (row tiles, experts, feature tiles). Stages the acc tile in shared memory, adds the
// rank-r update (kRank > 0: its rank tile; the update's rank runs in chunks of it) with WMMA,
// then hands the tile to `finish`.
template <int kRank, class Finish>
__global__ void __launch_bounds__(kThreads) expert_epilogue_kernel(const float* acc, int width, LowRankUpdate update,
                                                                   const int32_t* offsets, Finish finish) {
  constexpr int kLd = kTileCols + 4;  // fp32
  __shared__ alignas(128) float tile[kTileRows * kLd];
  const int e = blockIdx.y, c0 = blockIdx.z * kTileCols;
  const RowTile rows = row_tile(offsets, e, blockIdx.x);
  if (rows.count <= 0) return;
  for (int i = threadIdx.x; i < kTileRows * kTileCols / 4; i += kThreads) {
    const int row = i / (kTileCols / 4), c = i % (kTileCols / 4) * 4;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (row < rows.count && c0 + c < width) v = *reinterpret_cast<const float4*>(acc + int64_t(rows.begin + row) * width + c0 + c);
    *reinterpret_cast<float4*>(tile + row * kLd + c) = v;
  }
  if constexpr (kRank > 0) {
    constexpr int kLdR = kRank + 8;  // bf16
    __shared__ alignas(128) bf16 us[kTileRows * kLdR];  // u rows (A, row-major)
    __shared__ alignas(128) bf16 ls[kTileCols * kLdR];  // ls[c][q] = l_e(c0 + c, q): B (q x c), col-major
    const int warp = threadIdx.x / 32;
    const bf16 zero = __float2bfloat16_rn(0.0f);
    FragC delta[kTileCols / 16];
#pragma unroll
    for (int f = 0; f < kTileCols / 16; ++f) wmma::fill_fragment(delta[f], 0.0f);
    for (int q0 = 0; q0 < update.r; q0 += kRank) {
      __syncthreads();  // the previous chunk's fragments are loaded
      for (int i = threadIdx.x; i < kTileRows * kRank; i += kThreads) {
        const int row = i / kRank, q = i % kRank;
        us[row * kLdR + q] =
            row < rows.count && q0 + q < update.r ? update.u[int64_t(rows.begin + row) * update.r + q0 + q] : zero;
      }
      stage_rank_operand<kTileCols, kRank>(ls, kLdR, update.l, e, c0, width, q0, update.r);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kRank; kk += 16) {
        FragA a;
        wmma::load_matrix_sync(a, us + warp * 16 * kLdR + kk, kLdR);
#pragma unroll
        for (int f = 0; f < kTileCols / 16; ++f) {
          FragBCol b;
          wmma::load_matrix_sync(b, ls + f * 16 * kLdR + kk, kLdR);
          wmma::mma_sync(delta[f], a, b, delta[f]);
        }
      }
    }
    __syncthreads();  // every thread's tile stores are visible
#pragma unroll
    for (int f = 0; f < kTileCols / 16; ++f) {
      FragC c;
      float* at = tile + warp * 16 * kLd + f * 16;
      wmma::load_matrix_sync(c, at, kLd, wmma::mem_row_major);
#pragma unroll
      for (int i = 0; i < c.num_elements; ++i) c.x[i] += update.alpha * delta[f].x[i];
      wmma::store_matrix_sync(at, c, kLd, wmma::mem_row_major);
    }
  }
  __syncthreads();
  finish(tile, kLd, rows, c0, e);
}

template <class Finish>
void launch_epilogue(const float* acc, int width, const LowRankUpdate& update, const ExpertRows& rows, Finish finish,
                     cudaStream_t stream) {
  if (rows.max_rows <= 0) return;
  const dim3 grid(ceil_div(rows.max_rows, kTileRows), unsigned(rows.experts), ceil_div(width, kTileCols));
  if (update.u == nullptr || update.r <= 0) {
    expert_epilogue_kernel<0><<<grid, kThreads, 0, stream>>>(acc, width, update, rows.offsets, finish);
  } else {
    with_rank_tile(update.r, [&]<int kRank>() {
      expert_epilogue_kernel<kRank><<<grid, kThreads, 0, stream>>>(acc, width, update, rows.offsets, finish);
    });
  }
  OSSRL_CUDA_CHECK_LAUNCH();
}

// ---- router backward and the gather of dxn

constexpr int kMaxK = 8;
constexpr int kRouterThreads = 256;

__global__ void __launch_bounds__(kRouterThreads) router_backward_kernel(float* dxn, bf16* dys, const float* dout,
                                                                         const float* y, const int32_t* expert_index,
                                                                         const float* expert_weight,
                                                                         const int32_t* position,
                                                                         const bf16* router_weight, int k, int hidden) {
  __shared__ float partial[kRouterThreads / 32][kMaxK];
  __shared__ float dlogit[kMaxK];
  const int64_t t = blockIdx.x;
  const float* g = dout + t * hidden;
  float dot[kMaxK] = {};
  for (int c = threadIdx.x; c < hidden; c += kRouterThreads) {
    const float gc = g[c];
#pragma unroll
    for (int s = 0; s < kMaxK; ++s) {
      if (s < k) dot[s] += gc * y[(t * k + s) * hidden + c];
    }
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int s = 0; s < kMaxK; ++s) {
    for (int offset = 16; offset > 0; offset /= 2) dot[s] += __shfl_xor_sync(0xffffffffu, dot[s], offset);
    if (lane == 0) partial[warp][s] = dot[s];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float dw[kMaxK];
    float weighted = 0.0f;
    for (int s = 0; s < k; ++s) {
      dw[s] = 0.0f;
      for (int w = 0; w < kRouterThreads / 32; ++w) dw[s] += partial[w][s];
      weighted += expert_weight[t * k + s] * dw[s];
    }
    for (int s = 0; s < k; ++s) dlogit[s] = expert_weight[t * k + s] * (dw[s] - weighted);
  }
  __syncthreads();
  for (int c = threadIdx.x; c < hidden; c += kRouterThreads) {
    const float gc = g[c];
    float sum = 0.0f;
    for (int s = 0; s < k; ++s) {
      const int64_t a = t * k + s;
      sum += dlogit[s] * __bfloat162float(router_weight[int64_t(expert_index[a]) * hidden + c]);
      dys[int64_t(position[a]) * hidden + c] = __float2bfloat16_rn(expert_weight[a] * gc);
    }
    dxn[t * hidden + c] = sum;
  }
}

// One thread per 4 columns of a token.
__global__ void sum_expert_rows_kernel(float* dxn, const float* dxs, const int32_t* position, int n, int k,
                                       int hidden) {
  const int per_row = hidden / 4;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(n) * per_row) return;
  const int64_t t = i / per_row;
  const int c = int(i % per_row) * 4;
  float4 sum = *reinterpret_cast<const float4*>(dxn + t * hidden + c);
  for (int s = 0; s < k; ++s) {
    const float4 v = *reinterpret_cast<const float4*>(dxs + int64_t(position[t * k + s]) * hidden + c);
    sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
  }
  *reinterpret_cast<float4*>(dxn + t * hidden + c) = sum;
}

}  // namespace

void gather_rows(bf16* xs, int32_t* position, const bf16* xn, const int32_t* sorted, int rows, int k, int hidden,
                 cudaStream_t stream) {
  if (rows <= 0) return;
  constexpr int kBlock = 256;
  gather_rows_kernel<<<ceil_div(int64_t(rows) * (hidden / 8), kBlock), kBlock, 0, stream>>>(xs, position, xn, sorted,
                                                                                          rows, k, hidden);
  OSSRL_CUDA_CHECK_LAUNCH();
}

void decode_mxfp4_experts(bf16* stage, const ExpertWeights& w, const StageList& list, cudaStream_t stream) {
  if (list.count <= 0) return;
  constexpr int kBlock = 256;
  const int64_t blocks_per_expert = int64_t(w.out) * (w.in / 32);
  const dim3 grid(ceil_div(blocks_per_expert, kBlock), unsigned(list.count));
  decode_mxfp4_kernel<<<grid, kBlock, 0, stream>>>(stage, w.blocks, w.scales, blocks_per_expert, list);
  OSSRL_CUDA_CHECK_LAUNCH();
}

void lora_project(bf16* u, const bf16* x, int K, RankOperand<const bf16> m, int r, float alpha, const ExpertRows& rows,
                  cudaStream_t stream) {
  if (rows.max_rows <= 0 || r <= 0) return;
  with_rank_tile(r, [&]<int kRank>() {
    const dim3 grid(ceil_div(rows.max_rows, kTileRows), unsigned(rows.experts), ceil_div(r, kRank));
    lora_project_kernel<kRank><<<grid, kThreads, 0, stream>>>(u, x, K, m, r, alpha, rows.offsets);
  });
  OSSRL_CUDA_CHECK_LAUNCH();
}

void lora_weight_grad(RankOperand<float> grad, const bf16* p, int width, const bf16* q, int r, float alpha,
                      const ExpertRows& rows, cudaStream_t stream) {
  if (rows.max_rows <= 0 || r <= 0) return;
  with_rank_tile(r, [&]<int kRank>() {
    const dim3 grid(ceil_div(width, kTileCols), unsigned(rows.experts), ceil_div(r, kRank));
    lora_weight_grad_kernel<kRank><<<grid, kThreads, 0, stream>>>(grad, p, width, q, r, alpha, rows.offsets);
  });
  OSSRL_CUDA_CHECK_LAUNCH();
}

void gate_up_epilogue(bf16* g, bf16* h, const float* acc, const float* bias, const LowRankUpdate& update,
                      int intermediate, float limit, const ExpertRows& rows, cudaStream_t stream) {
  launch_epilogue(acc, 2 * intermediate, update, rows, GateUpFinish{g, h, bias, intermediate, limit}, stream);
}

void store_rows_epilogue(float* out, const float* acc, int width, const float* bias, const int32_t* row_map,
                         const LowRankUpdate& update, const ExpertRows& rows, cudaStream_t stream) {
  launch_epilogue(acc, width, update, rows, StoreRowsFinish{out, width, bias, row_map}, stream);
}

void swiglu_backward_epilogue(bf16* dg, const float* acc, const bf16* g, const LowRankUpdate& update, int intermediate,
                              float limit, const ExpertRows& rows, cudaStream_t stream) {
  launch_epilogue(acc, intermediate, update, rows, SwigluBackwardFinish{dg, g, intermediate, limit}, stream);
}

void router_backward(float* dxn, bf16* dys, const float* dout, const float* y, const int32_t* expert_index,
                     const float* expert_weight, const int32_t* position, const bf16* router_weight, int n, int k,
                     int hidden, cudaStream_t stream) {
  if (n <= 0) return;
  router_backward_kernel<<<unsigned(n), kRouterThreads, 0, stream>>>(dxn, dys, dout, y, expert_index, expert_weight,
                                                                     position, router_weight, k, hidden);
  OSSRL_CUDA_CHECK_LAUNCH();
}

void sum_expert_rows(float* dxn, const float* dxs, const int32_t* position, int n, int k, int hidden,
                     cudaStream_t stream) {
  if (n <= 0) return;
  constexpr int kBlock = 256;
  sum_expert_rows_kernel<<<ceil_div(int64_t(n) * (hidden / 4), kBlock), kBlock, 0, stream>>>(dxn, dxs, position, n, k,
                                                                                            hidden);
  OSSRL_CUDA_CHECK_LAUNCH();
}

}  // namespace ossrl::cuda::moe_train
