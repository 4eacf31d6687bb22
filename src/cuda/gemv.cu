// Skinny dense matmul (cuda/gemv.h): y [n, out] fp32 = (accumulate ? y : 0) + x [n, in] bf16 ·
// Wᵀ + bias for n ≤ 16, W bf16 [out, in]. At decode, n is the batch and W is read once per
// call, so the time is W's bytes over the memory bandwidth; the kernel is built to keep enough
// 16-byte loads of W in flight to reach it.
//
// Layout of the work. A cluster of `splits` CTAs owns 16 output rows (one mma m-tile); the
// warps of its CTAs split `in` into contiguous ranges of 32-wide k chunks, and each warp
// multiplies its range on the tensor cores (mma.sync m16n8k16: bf16 products are exact in fp32
// and accumulate in fp32, so the result is linear_forward's up to the order of the fp32 sums).
// The partial tiles are summed in a fixed order (deterministic), first the warps of a CTA in
// its shared memory, then the CTAs of the cluster through distributed shared memory, and the
// first CTA writes y with the bias and the accumulated y added: no separate bias pass.
// Clusters split k only where the tiles alone give too few warps (the router's 32 rows).
//
// Loading mma fragments straight from global memory in 16-byte pieces: a dot product may sum
// its k terms in any order, so the k positions of a chunk are permuted to suit the loads. Lane
// (g = lane / 4, t = lane % 4) loads W[row0 + g, k..k+8), W[row0 + g + 8, k..k+8) and
// x[token g, k..k+8) at k = chunk * 32 + 8t; those 8 values are its A (rows g, g+8) and B
// (column g) fragment entries of two mmas, the first taking k+0..k+3, the second k+4..k+7.
// Fragment column 2t+e (e = 0, 1) then stands for k+e+4j in mma j and column 2t+8+e for
// k+2+e+4j, the same map in A and B, and a bijection onto the chunk's 32 positions.
#include "cuda/gemv.h"

#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>

#include "cuda/check.h"

namespace ossrl::cuda {

namespace {

namespace cg = cooperative_groups;

constexpr int kTileRows = 16;   // output rows per CTA: the mma's m
constexpr int kTileTokens = 8;  // rows of x per mma: its n
constexpr int kChunk = 32;      // k per chunk: 4 lanes × 8 bf16
constexpr int kMaxWarps = 8;   // per CTA: 3 CTAs of ≤ 80 registers per thread fit an SM
constexpr int kMaxSplits = 8;  // CTAs per cluster (the portable cluster size)

// W is read once: keep it out of L1, which holds x (read by every CTA). Volatile so the
// compiler keeps it under its guard (a partial chunk's missing part is past the row). No L2
// prefetch hint: with .L2::256B qkv took 15% and lm_head 18% longer on an H100.
__device__ __forceinline__ uint4 load_weights(const __nv_bfloat16* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// d [16 × 8] fp32 += a [16 × 16] bf16 · b [16 × 8] bf16.
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Grid (tiles, splits), cluster (1, splits), blockDim.x / 32 warps; kTokenTiles 8-row tiles
// of x (n ≤ 8 kTokenTiles). Dynamic shared memory: float [warps + 1][4 kTokenTiles][32], the
// warps' partial tiles and the CTA's sum.
// Per lane and chunk: 2 loads of W (32 bytes) and kTokenTiles of x (16 bytes each, L1 hits
// after the first CTA), 2 kTokenTiles mmas. kUnroll chunks' loads are issued before their mmas.
template <int kTokenTiles>
__global__ void __launch_bounds__(kMaxWarps * 32)
    skinny_linear_kernel(float* __restrict__ y, const __nv_bfloat16* __restrict__ x,
                         const __nv_bfloat16* __restrict__ w, const float* __restrict__ bias, int n, int in, int out,
                         bool accumulate) {
  // Chunks in flight per lane: as many as fit in 80 registers (no spills, three 8-warp CTAs
  // per SM); 4 chunks = 128 bytes of W per lane at n ≤ 8. Measured on an H100: 8 chunks (128
  // registers, two CTAs per SM) made lm_head 3% faster but qkv and o_proj 7-10% slower; 2
  // chunks made qkv 7% and lm_head 19% slower.
  constexpr int kUnroll = kTokenTiles == 1 ? 4 : 3;
  constexpr int kValues = 4 * kTokenTiles;  // accumulator floats per lane
  extern __shared__ float partial[];
  float* cta_sum = partial + blockDim.x * kValues;

  const cg::cluster_group cluster = cg::this_cluster();
  const int splits = int(cluster.num_blocks()), split = int(cluster.block_rank());
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, warps = int(blockDim.x) >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row_lo = int(blockIdx.x) * kTileRows + g, row_hi = row_lo + 8;
  const int chunks = (in + kChunk - 1) / kChunk;
  const int slice = split * warps + warp, slices = splits * warps;
  const int chunk_begin = chunks * slice / slices, chunk_end = chunks * (slice + 1) / slices;
  // Where `in` is not a multiple of 32 the last chunk is partial: this lane's 8 values of it
  // exist only if 8t < in % 32.
  const int lane_chunk_end = min(chunk_end, (in - 8 * t + kChunk - 1) / kChunk);
  // Rows past `out` and tokens past n read a valid row instead (the last one): they only feed
  // accumulator rows and columns that are never stored, so they need no zeroing.
  const int64_t k0 = int64_t(chunk_begin) * kChunk + 8 * t;
  const __nv_bfloat16* w_lo = w + int64_t(min(row_lo, out - 1)) * in + k0;
  const __nv_bfloat16* w_hi = w + int64_t(min(row_hi, out - 1)) * in + k0;
  const __nv_bfloat16* x_row[kTokenTiles];
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) x_row[tt] = x + int64_t(min(tt * kTileTokens + g, n - 1)) * in + k0;
  const uint4 zero = make_uint4(0, 0, 0, 0);

  float acc[kTokenTiles][4] = {};
  for (int c = chunk_begin; c < chunk_end; c += kUnroll) {
    uint4 a_lo[kUnroll], a_hi[kUnroll], b[kUnroll][kTokenTiles];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // Zeros for the missing part of a partial chunk (x and W are finite, so they add nothing).
      const bool live = c + u < lane_chunk_end;
      a_lo[u] = live ? load_weights(w_lo + u * kChunk) : zero;
      a_hi[u] = live ? load_weights(w_hi + u * kChunk) : zero;
#pragma unroll
      for (int tt = 0; tt < kTokenTiles; ++tt) {
        b[u][tt] = live ? __ldg(reinterpret_cast<const uint4*>(x_row[tt] + u * kChunk)) : zero;
      }
    }
    w_lo += kUnroll * kChunk;
    w_hi += kUnroll * kChunk;
#pragma unroll
    for (int tt = 0; tt < kTokenTiles; ++tt) x_row[tt] += kUnroll * kChunk;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (c + u >= chunk_end) break;  // warp-uniform
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int tt = 0; tt < kTokenTiles; ++tt) {
          mma_bf16(acc[tt], word(a_lo[u], 2 * j), word(a_hi[u], 2 * j), word(a_lo[u], 2 * j + 1),
                   word(a_hi[u], 2 * j + 1), word(b[u][tt], 2 * j), word(b[u][tt], 2 * j + 1));
        }
      }
    }
  }

#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) partial[(warp * kValues + tt * 4 + r) * 32 + lane] = acc[tt][r];
  }
  __syncthreads();
  // Warp v sums accumulator entry v of every lane over the CTA's warps, then (after the
  // cluster barrier, which also publishes cta_sum) over the cluster's CTAs in the first CTA.
  for (int v = warp; v < kValues; v += warps) {
    float sum = 0.0f;
    for (int from = 0; from < warps; ++from) sum += partial[(from * kValues + v) * 32 + lane];
    cta_sum[v * 32 + lane] = sum;
  }
  cluster.sync();
  if (split == 0) {
    for (int v = warp; v < kValues; v += warps) {
      // Entry r of token tile tt: row g (r < 2) or g + 8, token 2t + (r & 1).
      const int tt = v / 4, r = v % 4;
      const int row = r < 2 ? row_lo : row_hi;
      const int token = tt * kTileTokens + 2 * t + (r & 1);
      float from_cta[kMaxSplits];  // all remote loads issued before the first add
#pragma unroll
      for (int s = 0; s < kMaxSplits; ++s) {
        from_cta[s] = s < splits ? cluster.map_shared_rank(cta_sum, s)[v * 32 + lane] : 0.0f;
      }
      float sum = 0.0f;
#pragma unroll
      for (int s = 0; s < kMaxSplits; ++s) sum += from_cta[s];
      if (row >= out || token >= n) continue;
      float* dst = y + int64_t(token) * out + row;
      if (bias != nullptr) sum += bias[row];
      *dst = accumulate ? *dst + sum : sum;
    }
  }
  if (splits > 1) cluster.sync();  // no CTA leaves while the first still reads its cta_sum
}

template <int kTokenTiles>
void launch(float* y, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* bias, int n, int in, int out,
            bool accumulate, int tiles, int warps, int splits, cudaStream_t stream) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(tiles), unsigned(splits));
  config.blockDim = dim3(unsigned(warps * 32));
  config.dynamicSmemBytes = size_t(warps + 1) * 4 * kTokenTiles * 32 * sizeof(float);
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 1;
  cluster.val.clusterDim.y = unsigned(splits);
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  OSSRL_CUDA_CHECK(
      cudaLaunchKernelEx(&config, skinny_linear_kernel<kTokenTiles>, y, x, w, bias, n, in, out, accumulate));
}

}  // namespace

bool skinny_linear_fits(const __nv_bfloat16* x, const __nv_bfloat16* w, int n, int in) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return n >= 1 && n <= kSkinnyMaxRows && in % 8 == 0 && aligned(x) && aligned(w);
}

void skinny_linear_forward(float* y, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* bias, int n,
                           int in, int out, bool accumulate, cudaStream_t stream) {
  if (n == 0 || out == 0) return;
  int device = 0, sms = 0;
  OSSRL_CUDA_CHECK(cudaGetDevice(&device));
  OSSRL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Enough warps that the grid has ~16 per SM (each with kUnroll chunks of W in flight: ~20 KB
  // of loads per SM, what covers the memory latency at full bandwidth): first more warps per
  // CTA, then, for few tiles, more CTAs per tile; but at least 2 chunks per warp.
  const int tiles = (out + kTileRows - 1) / kTileRows;
  const int chunks = (in + kChunk - 1) / kChunk;
  const int64_t target = int64_t(16) * sms;
  int warps = 4, splits = 1;
  while (warps < kMaxWarps && int64_t(tiles) * warps < target) warps *= 2;
  while (splits < kMaxSplits && int64_t(tiles) * warps * splits < target) splits *= 2;
  while (splits > 1 && warps * splits * 2 > chunks) splits /= 2;
  while (warps > 1 && warps * 2 > chunks) warps /= 2;
  if (n <= kTileTokens) {
    launch<1>(y, x, w, bias, n, in, out, accumulate, tiles, warps, splits, stream);
  } else {
    launch<2>(y, x, w, bias, n, in, out, accumulate, tiles, warps, splits, stream);
  }
}

}  // namespace ossrl::cuda
