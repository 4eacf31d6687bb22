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
// The same kernel, instantiated with kAttnInput, is skinny_qkv_rope_forward: x normed from the
// residual in each CTA's prologue and the RoPE + KV-cache write in its epilogue (cuda/gemv.h).
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
#include "cuda/launch.cuh"

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

// Asks L2 for `bytes` (a multiple of 16) of global memory from p (16-byte aligned): one
// instruction for a whole run, the data arriving while the thread goes on.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}
// What a warp of the fused attention input prefetches of each of its W rows: its first 8
// chunks, the first two unrolled iterations.
constexpr int kPrefetchBytes = 8 * kChunk * 2;

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

// Rows [0, n) of x_normed [n, stride] bf16 = rmsnorm_forward's rows of residual [n, in] fp32
// (its rounding; the sum of squares in another fp32 order). Each token gets warps / n warps (at
// least one), whose partial sums meet in `sums` (float [max(n, warps)]). Every thread calls it;
// it ends in __syncthreads.
__device__ void norm_rows(__nv_bfloat16* x_normed, int stride, float* sums, const float* residual,
                          const float* weight, float eps, int n, int in) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, warps = int(blockDim.x) >> 5;
  const int per = max(1, warps / n), groups = warps / per, sub = warp % per;
  const int packs = in / 4;
  const bool active = warp < groups * per;
  const auto* w4 = reinterpret_cast<const float4*>(weight);
  if (active) {
    for (int token = warp / per; token < n; token += groups) {
      const auto* row = reinterpret_cast<const float4*>(residual + int64_t(token) * in);
      float sum_sq = 0.0f;
      for (int p = sub * 32 + lane; p < packs; p += per * 32) {
        const float4 v = __ldg(row + p);
        sum_sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
      if (lane == 0) sums[token * per + sub] = sum_sq;
    }
  }
  __syncthreads();
  if (active) {
    for (int token = warp / per; token < n; token += groups) {
      float sum_sq = 0.0f;
      for (int i = 0; i < per; ++i) sum_sq += sums[token * per + i];
      const float rstd = 1.0f / sqrtf(sum_sq / float(in) + eps);  // as RmsnormRow::rstd
      const auto* row = reinterpret_cast<const float4*>(residual + int64_t(token) * in);
      auto* out = reinterpret_cast<uint2*>(x_normed + int64_t(token) * stride);
      for (int p = sub * 32 + lane; p < packs; p += per * 32) {
        const float4 v = __ldg(row + p), g = __ldg(w4 + p);
        // weight * (x * rstd), in that order, as RmsnormRow::scale rounds it.
        const __nv_bfloat162 lo = __halves2bfloat162(__float2bfloat16_rn(g.x * (v.x * rstd)),
                                                     __float2bfloat16_rn(g.y * (v.y * rstd)));
        const __nv_bfloat162 hi = __halves2bfloat162(__float2bfloat16_rn(g.z * (v.z * rstd)),
                                                     __float2bfloat16_rn(g.w * (v.w * rstd)));
        out[p] = make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
      }
    }
  }
  __syncthreads();
}

// rope_qkv_forward's rotation of one pair (a, b) = qkv rows (row, row + head_dim / 2) of token
// `token` (bias included), row = h · head_dim + j with j < head_dim / 2, and its write: q_out
// for a q head, the cache rows for a k or v head.
__device__ void rope_pair(const QkvRopeOperands& op, int token, int row, float a, float b) {
  const int half = op.head_dim / 2, h = row / op.head_dim, j = row % op.head_dim;
  float s, c;
  sincosf(float(op.positions[token]) * op.inv_freq[j], &s, &c);  // see cuda/rope.cu for why not __sincosf
  c *= op.attention_scaling;
  s *= op.attention_scaling;
  const float rotated_a = a * c - b * s;
  const float rotated_b = b * c + a * s;
  if (h < op.heads) {
    float* q = op.q_out + (int64_t(token) * op.heads + h) * op.head_dim;
    q[j] = rotated_a;
    q[j + half] = rotated_b;
    return;
  }
  const int64_t slot = op.kv_slots[token];
  if (slot < 0) return;  // a padding token writes no cache row
  const bool is_k = h < op.heads + op.kv_heads;
  const int kv = is_k ? h - op.heads : h - op.heads - op.kv_heads;
  __nv_bfloat16* dst = (is_k ? op.k_cache : op.v_cache) + (slot * op.kv_heads + kv) * op.head_dim;
  dst[j] = __float2bfloat16_rn(is_k ? rotated_a : a);
  dst[j + half] = __float2bfloat16_rn(is_k ? rotated_b : b);
}

// Shared memory ahead of the partial sums: kAttnInput's normed rows, padded by 64 bytes so the
// 8 lanes of a 16-byte load phase (two tokens × 4 k pieces) fall in distinct banks.
constexpr int kNormedPad = 32;

// Grid (tiles, splits), cluster (1, splits), blockDim.x / 32 warps; kTokenTiles 8-row tiles
// of x (n ≤ 8 kTokenTiles). Dynamic shared memory: kAttnInput's normed rows (bf16 [n, in +
// kNormedPad]), then float [warps + 1][4 kTokenTiles][32], the warps' partial tiles and the
// CTA's sum.
// Per lane and chunk: 2 loads of W (32 bytes) and kTokenTiles of x (16 bytes each, L1 hits
// after the first CTA), 2 kTokenTiles mmas. kUnroll chunks' loads are issued before their mmas,
// the first kUnroll's W before the wait for the kernel before (cuda/launch.cuh): W is a weight,
// so a dependent asks for it while that kernel still runs. Released after the wait.
// kAttnInput (skinny_qkv_rope_forward): x is op.residual's rows normed into shared memory by
// each CTA, the tile's rows are (q·8 + g, q·8 + g + head_dim/2) of a head (q the tile within
// it) rather than 16 consecutive rows, and the epilogue applies rope_pair instead of writing y.
template <int kTokenTiles, bool kAttnInput, int kUnroll>
__global__ void __launch_bounds__(kMaxWarps * 32)
    skinny_linear_kernel(float* __restrict__ y, const __nv_bfloat16* __restrict__ x,
                         const __nv_bfloat16* __restrict__ w, const float* __restrict__ bias, int n, int in, int out,
                         bool accumulate, const QkvRopeOperands op) {
  constexpr int kValues = 4 * kTokenTiles;  // accumulator floats per lane
  extern __shared__ __align__(16) unsigned char shared[];
  const int x_stride = kAttnInput ? in + kNormedPad : in;
  __nv_bfloat16* x_normed = reinterpret_cast<__nv_bfloat16*>(shared);
  float* partial = reinterpret_cast<float*>(shared + (kAttnInput ? size_t(n) * x_stride * sizeof(__nv_bfloat16) : 0));
  float* cta_sum = partial + blockDim.x * kValues;

  const cg::cluster_group cluster = cg::this_cluster();
  const int splits = int(cluster.num_blocks()), split = int(cluster.block_rank());
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, warps = int(blockDim.x) >> 5;
  const int g = lane >> 2, t = lane & 3;
  int row_lo = int(blockIdx.x) * kTileRows + g, row_hi = row_lo + 8;
  const int chunks = (in + kChunk - 1) / kChunk;
  const int slice = split * warps + warp, slices = splits * warps;
  const int chunk_begin = chunks * slice / slices, chunk_end = chunks * (slice + 1) / slices;
  if constexpr (kAttnInput) {
    const int half = op.head_dim / 2, tiles_per_head = half / 8;
    row_lo = int(blockIdx.x) / tiles_per_head * op.head_dim + int(blockIdx.x) % tiles_per_head * 8 + g;
    row_hi = row_lo + half;
    // The norm's round trips would otherwise come before the first W bytes are even asked
    // for: lanes t = 0 first ask L2 for their two rows' first kPrefetchBytes of the slice (W
    // and the slice start are 16-byte aligned and in % 8 == 0, so every run is too).
    if (t == 0 && chunk_begin < chunk_end) {
      const uint32_t bytes = uint32_t(min(kPrefetchBytes, (in - chunk_begin * kChunk) * 2));
      for (const int row : {row_lo, row_hi}) {
        if (row < out) prefetch_l2(w + int64_t(row) * in + int64_t(chunk_begin) * kChunk, bytes);
      }
    }
  }
  // Where `in` is not a multiple of 32 the last chunk is partial: this lane's 8 values of it
  // exist only if 8t < in % 32.
  const int lane_chunk_end = min(chunk_end, (in - 8 * t + kChunk - 1) / kChunk);
  // Rows past `out` and tokens past n read a valid row instead (the last one): they only feed
  // accumulator rows and columns that are never stored, so they need no zeroing.
  const int64_t k0 = int64_t(chunk_begin) * kChunk + 8 * t;
  const __nv_bfloat16* w_lo = w + int64_t(min(row_lo, out - 1)) * in + k0;
  const __nv_bfloat16* w_hi = w + int64_t(min(row_hi, out - 1)) * in + k0;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  // The next kUnroll chunks of W from chunk c on (zeros for the missing part of a partial
  // chunk: x and W are finite, so they add nothing).
  uint4 a_lo[kUnroll], a_hi[kUnroll];
  const auto load_w = [&](int c) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool live = c + u < lane_chunk_end;
      a_lo[u] = live ? load_weights(w_lo + u * kChunk) : zero;
      a_hi[u] = live ? load_weights(w_hi + u * kChunk) : zero;
    }
    w_lo += kUnroll * kChunk;
    w_hi += kUnroll * kChunk;
  };
  load_w(chunk_begin);  // x, y and the residual come from the kernels before: after the wait
  wait_for_producers();
  release_dependents();
  if constexpr (kAttnInput) {
    norm_rows(x_normed, x_stride, partial, op.residual, op.norm_weight, op.eps, n, in);
    x = x_normed;
  }
  const __nv_bfloat16* x_row[kTokenTiles];
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) x_row[tt] = x + int64_t(min(tt * kTileTokens + g, n - 1)) * x_stride + k0;

  float acc[kTokenTiles][4] = {};
  for (int c = chunk_begin; c < chunk_end; c += kUnroll) {
    if (c != chunk_begin) load_w(c);
    uint4 b[kUnroll][kTokenTiles];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool live = c + u < lane_chunk_end;
#pragma unroll
      for (int tt = 0; tt < kTokenTiles; ++tt) {
        const auto* piece = reinterpret_cast<const uint4*>(x_row[tt] + u * kChunk);
        b[u][tt] = !live ? zero : kAttnInput ? *piece : __ldg(piece);  // shared memory or global
      }
    }
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
  // Entry v of every lane summed over the cluster's CTAs, in a fixed order.
  const auto cluster_sum = [&](int v) {
    float from_cta[kMaxSplits];  // all remote loads issued before the first add
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) {
      from_cta[s] = s < splits ? cluster.map_shared_rank(cta_sum, s)[v * 32 + lane] : 0.0f;
    }
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) sum += from_cta[s];
    return sum;
  };
  if (split == 0) {
    if constexpr (kAttnInput) {
      // Entries e and e + 2 of token tile tt are rows (row_lo, row_hi) of token 2t + e: one pair.
      for (int pair = warp; pair < 2 * kTokenTiles; pair += warps) {
        const int tt = pair / 2, e = pair % 2;
        float a = cluster_sum(tt * 4 + e), b = cluster_sum(tt * 4 + e + 2);
        const int token = tt * kTileTokens + 2 * t + e;
        if (token >= n) continue;
        if (bias != nullptr) {
          a += bias[row_lo];
          b += bias[row_hi];
        }
        rope_pair(op, token, row_lo, a, b);
      }
    } else {
      for (int v = warp; v < kValues; v += warps) {
        // Entry r of token tile tt: row g (r < 2) or g + 8, token 2t + (r & 1).
        const int tt = v / 4, r = v % 4;
        const int row = r < 2 ? row_lo : row_hi;
        const int token = tt * kTileTokens + 2 * t + (r & 1);
        float sum = cluster_sum(v);
        if (row >= out || token >= n) continue;
        float* dst = y + int64_t(token) * out + row;
        if (bias != nullptr) sum += bias[row];
        *dst = accumulate ? *dst + sum : sum;
      }
    }
  }
  if (splits > 1) cluster.sync();  // no CTA leaves while the first still reads its cta_sum
}

// The grid of a skinny call: tiles of 16 output rows, warps per CTA, CTAs per cluster.
struct SkinnyGrid {
  int tiles, warps, splits;
};

SkinnyGrid skinny_grid(int in, int out) {
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
  return {tiles, warps, splits};
}

size_t normed_rows_bytes(int n, int in) { return size_t(n) * size_t(in + kNormedPad) * sizeof(__nv_bfloat16); }

int max_shared_bytes() {
  int device = 0, bytes = 0;
  OSSRL_CUDA_CHECK(cudaGetDevice(&device));
  OSSRL_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// kUnroll: chunks in flight per lane. As many as fit in 80 registers (no spills, three 8-warp
// CTAs per SM) for most shapes: 4 chunks = 128 bytes of W per lane at n ≤ 8, 3 at n ≤ 16.
// Measured on an H100: 8 chunks (128 registers, two CTAs per SM) made lm_head 3% faster but qkv
// and o_proj 7-10% slower; 2 chunks made qkv 7% and lm_head 19% slower. So matrices of
// kLongOut rows or more (the lm_head, many waves of CTAs) take 8 at n ≤ 8.
constexpr int kLongOut = 65536;

template <int kTokenTiles, bool kAttnInput, int kUnroll>
void launch(float* y, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* bias, int n, int in, int out,
            bool accumulate, const QkvRopeOperands& op, cudaStream_t stream) {
  const SkinnyGrid grid = skinny_grid(in, out);
  const auto kernel = skinny_linear_kernel<kTokenTiles, kAttnInput, kUnroll>;
  if constexpr (kAttnInput) {
    // Up to 16 normed rows of 2880 exceed the default 48 KiB: raise the limit once, outside
    // any graph capture (skinny_qkv_rope_forward's contract).
    [[maybe_unused]] static const bool raised = [&] {
      OSSRL_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_shared_bytes()));
      return true;
    }();
  }
  // A programmatic dependent (cuda/launch.cuh) only as the fused attention input, which
  // follows the MoE combine, a single short round trip that its early weight requests hardly
  // delay. The other skinny matmuls follow latency-bound kernels (o_proj the attention), which
  // the ~10 MB of weight requests a dependent queues ahead of theirs slow down by more than the
  // overlap gains. On an H100 at batch 1, o_proj as a dependent made the step 2.45 ms, not
  // 2.39; o_proj and the lm_head as dependents that ask for nothing before their wait, 2.62
  // against 2.34 (their parked CTAs hold up the attention and the final norm).
  const LaunchShape shape{.grid = dim3(unsigned(grid.tiles), unsigned(grid.splits)),
                          .block = dim3(unsigned(grid.warps * 32)),
                          .shared_bytes = (kAttnInput ? normed_rows_bytes(n, in) : 0) +
                                          size_t(grid.warps + 1) * 4 * kTokenTiles * 32 * sizeof(float),
                          .cluster = dim3(1, unsigned(grid.splits), 1),
                          .dependent = kAttnInput};
  launch_kernel(kernel, shape, stream, y, x, w, bias, n, in, out, accumulate, op);
}

template <bool kAttnInput>
void launch_rows(float* y, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* bias, int n, int in,
                 int out, bool accumulate, const QkvRopeOperands& op, cudaStream_t stream) {
  if (n > kTileTokens) {
    launch<2, kAttnInput, 3>(y, x, w, bias, n, in, out, accumulate, op, stream);
  } else if (!kAttnInput && out >= kLongOut) {
    launch<1, false, 8>(y, x, w, bias, n, in, out, accumulate, op, stream);
  } else {
    launch<1, kAttnInput, 4>(y, x, w, bias, n, in, out, accumulate, op, stream);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool skinny_linear_fits(const __nv_bfloat16* x, const __nv_bfloat16* w, int n, int in) {
  return n >= 1 && n <= kSkinnyMaxRows && in % 8 == 0 && aligned16(x) && aligned16(w);
}

void skinny_linear_forward(float* y, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* bias, int n,
                           int in, int out, bool accumulate, cudaStream_t stream) {
  if (n == 0 || out == 0) return;
  launch_rows<false>(y, x, w, bias, n, in, out, accumulate, QkvRopeOperands{}, stream);
}

bool skinny_qkv_rope_fits(const QkvRopeOperands& op) {
  const int packs = op.hidden / 4;
  // The partial sums' floats for the largest grid (8 warps, 2 token tiles) after the rows.
  const size_t bytes = normed_rows_bytes(op.n, op.hidden) + size_t(kMaxWarps + 1) * 8 * 32 * sizeof(float);
  return op.n >= 1 && op.n <= kSkinnyMaxRows && op.hidden % 8 == 0 && packs > 0 && op.head_dim % 16 == 0 &&
         op.head_dim > 0 && aligned16(op.residual) && aligned16(op.norm_weight) && aligned16(op.w) &&
         bytes <= size_t(max_shared_bytes());
}

void skinny_qkv_rope_forward(const QkvRopeOperands& op, cudaStream_t stream) {
  const int out = (op.heads + 2 * op.kv_heads) * op.head_dim;
  if (op.n == 0 || out == 0) return;
  launch_rows<true>(nullptr, nullptr, op.w, op.bias, op.n, op.hidden, out, false, op, stream);
}

}  // namespace ossrl::cuda
