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

// A warp's 16 x kRank strip of a LoRA tile product in fp32: zeroed, fed kStep-deep slices of
// the staged operands, then spilled to shared memory for the CTA's epilogue. a(kk) points at
// the warp's 16 x 16 A fragment at depth kk, b(kk, f) at B's fragment for rank columns 16f.
template <int kRank>
struct RankAccumulator {
  FragC acc[kRank / 16];

  __device__ __forceinline__ RankAccumulator() {
#pragma unroll
    for (int f = 0; f < kRank / 16; ++f) wmma::fill_fragment(acc[f], 0.0f);
  }
  template <class FragAT, class FragBT, int kStep, class AAt, class BAt>
  __device__ __forceinline__ void multiply(AAt a, int lda, BAt b, int ldb) {
#pragma unroll
    for (int kk = 0; kk < kStep; kk += 16) {
      FragAT fa;
      wmma::load_matrix_sync(fa, a(kk), lda);
#pragma unroll
      for (int f = 0; f < kRank / 16; ++f) {
        FragBT fb;
        wmma::load_matrix_sync(fb, b(kk, f), ldb);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }
  // The strip to rows [16 warp, 16 warp + 16) of out (row-major, ld), then the CTA waits so
  // the epilogue reads every warp's rows.
  __device__ __forceinline__ void spill(float* out, int ld, int warp) {
#pragma unroll
    for (int f = 0; f < kRank / 16; ++f) {
      wmma::store_matrix_sync(out + warp * 16 * ld + f * 16, acc[f], ld, wmma::mem_row_major);
    }
    __syncthreads();
  }
};

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

// A thread's share of a [kCols][kRank] tile of a rank operand, t[c][q] = l_e(c0 + c, q0 + q), zero
// outside (features >= width or rank >= r): loaded into registers (so the loads of the next
// tile fly while the current one is used), then stored to shared memory. Element i of the tile
// runs along whichever index is contiguous in memory.
template <int kCols, int kRank>
struct RankTile {
  static_assert(kCols * kRank % kThreads == 0 && kThreads % kCols == 0 && kThreads % kRank == 0,
                "a tile is whole rounds of the CTA");
  static constexpr int kPerThread = kCols * kRank / kThreads;
  bf16 v[kPerThread];

  // Element j of this thread is (c, q) = (c + j * dc, q + j * dq): one of dc, dq is 0, so the
  // thread walks one pointer with one stride.
  struct Walk {
    int c, q, dc, dq;
  };
  __device__ __forceinline__ static Walk walk(bool q_contiguous) {
    const int t = threadIdx.x;
    return q_contiguous ? Walk{t / kRank, t % kRank, kThreads / kRank, 0} : Walk{t % kCols, t / kCols, 0, kThreads / kCols};
  }
  __device__ __forceinline__ void load(const RankOperand<const bf16>& m, int e, int64_t c0, int64_t width, int q0,
                                       int r) {
    const Walk w = walk(m.stride_q == 1);
    const bf16* p = m.data + e * m.stride_e + (c0 + w.c) * m.stride_c + int64_t(q0 + w.q) * m.stride_q;
    const int64_t step = w.dc * m.stride_c + w.dq * m.stride_q;
    const bf16 zero = __float2bfloat16_rn(0.0f);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const bool inside = c0 + w.c + j * w.dc < width && q0 + w.q + j * w.dq < r;
      v[j] = inside ? p[j * step] : zero;
    }
  }
  __device__ __forceinline__ void store(bf16* dst, int ld, bool q_contiguous) const {
    const Walk w = walk(q_contiguous);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) dst[(w.c + j * w.dc) * ld + w.q + j * w.dq] = v[j];
  }
};

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

// The exact decode of cuda/moe.cu (see its header), here for a whole stage: a 32-bit word of
// codes (elements i = 0..7 in nibble i) becomes 4 bf16 pairs; each pair is fp4 * 2^-126 built
// from the code's bits (the 3 magnitude bits land on the two low exponent bits and the top
// mantissa bit, so E2M1's subnormal 0.5 is the bf16 subnormal 2^-127; the sign on bit 15),
// then scaled by 2^(scale - 1) in two exact bf16x2 multiplies whose factors are bf16 normals:
// 2^(min(scale, 128) - 1) and 2^(max(scale, 128) - 128). Each product has two significant
// bits, so it is exact unless it reaches 2^128, which is inf as ldexp gives: bit for bit
// io/mxfp4 for every scale, 0 (subnormals) and 255 (±0.5 -> ±2^127) included. The
// arithmetic stays off the shared-memory pipe (a table lookup per code was its bottleneck).
__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// The codes selected by kMask (one nibble in each 16-bit half, at bit 0 or 4 of the half) as
// fp4 * 2^-126 bf16 bits: the multiply makes two copies of each nibble, one with its magnitude
// bits at bits 6..8 of the half and one with its sign at bit 15.
template <uint32_t kMask, uint32_t kCopies>
__device__ __forceinline__ uint32_t fp4_pair_bits(uint32_t codes) {
  return ((codes & kMask) * kCopies) & 0x81C081C0u;
}

// 8 codes sharing `scale` -> 4 bf16 pairs in element order (w0, w1), (w2, w3), (w4, w5), (w6, w7).
__device__ __forceinline__ uint4 decode_fp4_word(uint32_t codes, uint32_t scale) {
  const uint32_t upper = codes >> 8;  // elements 2, 3 and 6, 7 where 0, 1 and 4, 5 were
  // Pairs (w0, w4), (w1, w5), (w2, w6), (w3, w7).
  uint32_t p[4] = {fp4_pair_bits<0x000F000Fu, 0x1040u>(codes), fp4_pair_bits<0x00F000F0u, 0x0104u>(codes),
                   fp4_pair_bits<0x000F000Fu, 0x1040u>(upper), fp4_pair_bits<0x00F000F0u, 0x0104u>(upper)};
  const uint32_t low = (min(scale, 128u) + 126u) * 0x00800080u;  // bf16 2^(min(scale,128) - 1), both halves
  const uint32_t high = (max(scale, 128u) - 1u) * 0x00800080u;   // bf16 2^(max(scale,128) - 128)
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = mul_bf16x2(mul_bf16x2(p[i], low), high);
  // Low halves of (p0, p1) are w0, w1; high halves w4, w5; likewise p2, p3.
  return make_uint4(__byte_perm(p[0], p[1], 0x5410), __byte_perm(p[2], p[3], 0x5410), __byte_perm(p[0], p[1], 0x7632),
                    __byte_perm(p[2], p[3], 0x7632));
}

constexpr int kDecodeThreads = 64;  // small CTAs, no shared memory: they fit beside GEMM CTAs
constexpr int kDecodeWords = 4;     // words per thread, loaded together

// Thread i of the grid decodes words i, i + 64, ... of its CTA's span: 4-byte loads and 16-byte
// stores, both contiguous across a warp.
__global__ void __launch_bounds__(kDecodeThreads) decode_mxfp4_kernel(bf16* stage, const uint32_t* codes,
                                                                      const uint8_t* scales, int64_t words_per_expert,
                                                                      StageList list) {
  const int64_t expert = list.expert[blockIdx.y];
  const uint32_t* src = codes + expert * words_per_expert;
  const uint8_t* src_scales = scales + expert * (words_per_expert / 4);  // 4 words per 32-value block
  uint4* dst = reinterpret_cast<uint4*>(stage) + int64_t(blockIdx.y) * words_per_expert;
  const int64_t first = int64_t(blockIdx.x) * kDecodeThreads * kDecodeWords + threadIdx.x;
  uint32_t word[kDecodeWords], scale[kDecodeWords];
#pragma unroll
  for (int j = 0; j < kDecodeWords; ++j) {
    const int64_t i = first + j * kDecodeThreads;
    if (i < words_per_expert) {
      word[j] = __ldg(src + i);
      scale[j] = __ldg(src_scales + i / 4);
    }
  }
#pragma unroll
  for (int j = 0; j < kDecodeWords; ++j) {
    const int64_t i = first + j * kDecodeThreads;
    if (i < words_per_expert) dst[i] = decode_fp4_word(word[j], scale[j]);
  }
}

// ---- LoRA projection: u = alpha · x · m_e

// grid (row tiles, experts, rank tiles). K advances 64 per stage; x tile [64 rows][64] and
// m tile [kRank][64] (B = m as col-major k x q) in shared memory, the next stage's tiles loaded
// into registers while the current one is multiplied.
template <int kRank>
__global__ void __launch_bounds__(kThreads) lora_project_kernel(bf16* u, const bf16* x, int K,
                                                                RankOperand<const bf16> m, int r, float alpha,
                                                                ExpertRows experts) {
  constexpr int kStep = 64;
  constexpr int kLd = kStep + 8;  // bf16; padding staggers the rows across banks
  constexpr int kLdOut = kRank + 4;
  constexpr int kXPieces = kTileRows * kStep / 8 / kThreads;  // 16-byte pieces of the x tile per thread
  __shared__ alignas(128) bf16 xs[kTileRows * kLd];
  __shared__ alignas(128) bf16 ms[kRank * kLd];
  __shared__ alignas(128) float out[kTileRows * kLdOut];
  const int e = experts.first + blockIdx.y, q0 = blockIdx.z * kRank;
  const RowTile tile = row_tile(experts.offsets, e, blockIdx.x);
  if (tile.count <= 0) return;
  const int warp = threadIdx.x / 32;
  // m with its two indices swapped: ms[q][c] = m_e(k0 + c, q0 + q), staged as [rank][K].
  const RankOperand<const bf16> mt{m.data, m.stride_e, m.stride_q, m.stride_c};
  uint4 xr[kXPieces];
  RankTile<kRank, kStep> mr;
  auto load = [&](int k0) {
#pragma unroll
    for (int j = 0; j < kXPieces; ++j) {
      const int i = threadIdx.x + j * kThreads, row = i / (kStep / 8), c = i % (kStep / 8) * 8;
      xr[j] = row < tile.count && k0 + c < K ? *reinterpret_cast<const uint4*>(x + int64_t(tile.begin + row) * K + k0 + c)
                                             : make_uint4(0, 0, 0, 0);
    }
    mr.load(mt, e, q0, r, k0, K);
  };

  RankAccumulator<kRank> acc;
  load(0);
  for (int k0 = 0; k0 < K; k0 += kStep) {
#pragma unroll
    for (int j = 0; j < kXPieces; ++j) {
      const int i = threadIdx.x + j * kThreads, row = i / (kStep / 8), c = i % (kStep / 8) * 8;
      *reinterpret_cast<uint4*>(xs + row * kLd + c) = xr[j];
    }
    mr.store(ms, kLd, mt.stride_q == 1);
    __syncthreads();
    if (k0 + kStep < K) load(k0 + kStep);
    acc.template multiply<FragA, FragBCol, kStep>([&](int kk) { return xs + warp * 16 * kLd + kk; }, kLd,
                                                  [&](int kk, int f) { return ms + f * 16 * kLd + kk; }, kLd);
    __syncthreads();
  }
  acc.spill(out, kLdOut, warp);
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
                                                                    ExpertRows experts) {
  constexpr int kStep = 32;
  constexpr int kLdP = kTileCols + 8;
  constexpr int kLdQ = kRank + 8;
  constexpr int kLdOut = kRank + 4;
  __shared__ alignas(128) bf16 ps[kStep * kLdP];
  __shared__ alignas(128) bf16 qs[kStep * kLdQ];
  __shared__ alignas(128) float out[kTileCols * kLdOut];
  const int e = experts.first + blockIdx.y, c0 = blockIdx.x * kTileCols, q0 = blockIdx.z * kRank;
  const int begin = experts.offsets[e], end = experts.offsets[e + 1];
  if (begin == end) return;
  const int warp = threadIdx.x / 32;
  const bf16 zero = __float2bfloat16_rn(0.0f);

  RankAccumulator<kRank> acc;
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
    acc.template multiply<FragACol, FragBRow, kStep>([&](int kk) { return ps + kk * kLdP + warp * 16; }, kLdP,
                                                     [&](int kk, int f) { return qs + kk * kLdQ + f * 16; }, kLdQ);
    __syncthreads();
  }
  acc.spill(out, kLdOut, warp);
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
// then hands the tile to `finish`. The first chunk's u and l tiles are loaded together with the
// acc tile (one round trip to memory), each next chunk's while the current one is multiplied.
template <int kRank, class Finish>
__global__ void __launch_bounds__(kThreads, 4) expert_epilogue_kernel(const float* acc, int width, LowRankUpdate update,
                                                                   ExpertRows experts, Finish finish) {
  constexpr int kLd = kTileCols + 4;  // fp32
  __shared__ alignas(128) float tile[kTileRows * kLd];
  const int e = experts.first + blockIdx.y, c0 = blockIdx.z * kTileCols;
  const RowTile rows = row_tile(experts.offsets, e, blockIdx.x);
  if (rows.count <= 0) return;
  auto load_tile = [&] {
#pragma unroll 4
    for (int i = threadIdx.x; i < kTileRows * kTileCols / 4; i += kThreads) {
      const int row = i / (kTileCols / 4), c = i % (kTileCols / 4) * 4;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (row < rows.count && c0 + c < width) v = *reinterpret_cast<const float4*>(acc + int64_t(rows.begin + row) * width + c0 + c);
      *reinterpret_cast<float4*>(tile + row * kLd + c) = v;
    }
  };
  if constexpr (kRank == 0) {
    load_tile();
  } else {
    constexpr int kLdR = kRank + 8;  // bf16
    __shared__ alignas(128) bf16 us[kTileRows * kLdR];  // u rows (A, row-major)
    __shared__ alignas(128) bf16 ls[kTileCols * kLdR];  // ls[c][q] = l_e(c0 + c, q): B (q x c), col-major
    const int warp = threadIdx.x / 32;
    // u [rows, r] as a rank operand over the row index.
    const RankOperand<const bf16> u_rows{update.u, 0, update.r, 1};
    RankTile<kTileRows, kRank> ur;
    RankTile<kTileCols, kRank> lr;
    ur.load(u_rows, 0, rows.begin, rows.begin + rows.count, 0, update.r);
    lr.load(update.l, e, c0, width, 0, update.r);
    load_tile();
    FragC delta[kTileCols / 16];
#pragma unroll
    for (int f = 0; f < kTileCols / 16; ++f) wmma::fill_fragment(delta[f], 0.0f);
    for (int q0 = 0; q0 < update.r; q0 += kRank) {
      ur.store(us, kLdR, true);
      lr.store(ls, kLdR, update.l.stride_q == 1);
      __syncthreads();
      if (q0 + kRank < update.r) {
        ur.load(u_rows, 0, rows.begin, rows.begin + rows.count, q0 + kRank, update.r);
        lr.load(update.l, e, c0, width, q0 + kRank, update.r);
      }
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
      __syncthreads();  // us, ls are read before the next chunk overwrites them
    }
    // The loop's barriers also made every thread's tile stores visible.
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
    expert_epilogue_kernel<0><<<grid, kThreads, 0, stream>>>(acc, width, update, rows, finish);
  } else {
    with_rank_tile(update.r, [&]<int kRank>() {
      expert_epilogue_kernel<kRank><<<grid, kThreads, 0, stream>>>(acc, width, update, rows, finish);
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
  const int64_t words_per_expert = int64_t(w.out) * (w.in / 8);
  const dim3 grid(ceil_div(words_per_expert, kDecodeThreads * kDecodeWords), unsigned(list.count));
  decode_mxfp4_kernel<<<grid, kDecodeThreads, 0, stream>>>(stage, reinterpret_cast<const uint32_t*>(w.blocks), w.scales,
                                                          words_per_expert, list);
  OSSRL_CUDA_CHECK_LAUNCH();
}

void lora_project(bf16* u, const bf16* x, int K, RankOperand<const bf16> m, int r, float alpha, const ExpertRows& rows,
                  cudaStream_t stream) {
  if (rows.max_rows <= 0 || r <= 0) return;
  with_rank_tile(r, [&]<int kRank>() {
    const dim3 grid(ceil_div(rows.max_rows, kTileRows), unsigned(rows.experts), ceil_div(r, kRank));
    lora_project_kernel<kRank><<<grid, kThreads, 0, stream>>>(u, x, K, m, r, alpha, rows);
  });
  OSSRL_CUDA_CHECK_LAUNCH();
}

void lora_weight_grad(RankOperand<float> grad, const bf16* p, int width, const bf16* q, int r, float alpha,
                      const ExpertRows& rows, cudaStream_t stream) {
  if (rows.max_rows <= 0 || r <= 0) return;
  with_rank_tile(r, [&]<int kRank>() {
    const dim3 grid(ceil_div(width, kTileCols), unsigned(rows.experts), ceil_div(r, kRank));
    lora_weight_grad_kernel<kRank><<<grid, kThreads, 0, stream>>>(grad, p, width, q, r, alpha, rows);
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
