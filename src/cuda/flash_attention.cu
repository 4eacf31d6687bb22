// Sink-aware causal flash attention for training (cuda/flash_attention.h), on tensor cores.
//
// Forward: one CTA per (sequence, 64-query tile, head), 4 warps of 16 queries. Key tiles of 64
// stream through shared memory (cp.async, two buffers) from the oldest one the window lets the
// tile see up to the diagonal; tiles outside the window are never touched, so a sliding layer
// costs O(tokens x window). A warp computes S = Q K^T and O += P V with bf16 mma.sync (fp32
// accumulation) and keeps an online softmax per row that starts from the sink logit. q arrives
// in fp32 and is split into bf16 hi + lo (two mmas), as the rollout engine's paged kernel does,
// so both score with ~16 mantissa bits and the trainer's log-probs track the sampler's; P is
// rounded to bf16 for P V. Each row's log-sum-exp (sink included) is kept for the backward.
//
// Backward, FA2-style: a pass computes D = dout · out per (token, head) and zeroes dq. Then one
// CTA per (sequence, 64-key tile, kv head), 4 warps of 16 keys, loops over the query heads
// sharing that kv head and over the query tiles that see its keys. Per query tile it recomputes
// S^T = K Q^T (q hi + lo, so P matches the forward's lse), P^T = exp(S^T - lse),
// dP^T = V dO^T, dS^T = P^T (dP^T - D), accumulates dV += P^T dO and dK += dS^T Q in registers
// (written once, no atomics), and adds dQ += dS K into dq with fp32 atomics: dS^T goes through
// shared memory so the warps re-split by query for that product. Computing the transposed
// products keeps keys as the mma rows, so P^T and dS^T pass from accumulators to A fragments
// with no shuffles. The next query tile's fp32 q and dout load (cp.async) while the current one
// is computed. dsinks is a fixed-order reduction per head (deterministic).
#include "cuda/flash_attention.h"

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/check.h"
#include "cuda/mma.cuh"

namespace ossrl::cuda {
namespace {

constexpr int kHeadDim = 64;
// Queries per forward CTA, keys per backward CTA, and the step over the other side.
constexpr int kTile = 64;
constexpr int kWarps = kTile / 16;  // 16 rows each: the mma's m
constexpr int kThreads = kWarps * 32;
// bf16 rows in shared memory padded to 144 bytes: the 8 rows an ldmatrix phase reads, and the
// 8 rows a C fragment stores, fall on distinct banks.
constexpr int kRowPad = kHeadDim + 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// q is scaled by log2(e) / sqrt(64) before it is split, so scores come out in log2 units.
constexpr float kQueryScale = kLog2e / 8.0f;
constexpr float kInvSqrtHeadDim = 0.125f;
constexpr int kSinkThreads = 256;

// Whether some (query, key) pair of the 64-query tile at position q_first and the 64-key tile
// at k_first is masked: the tile crosses the diagonal or the window's far edge. Tiles that
// are not skip the per-element test.
__device__ bool tile_needs_mask(int q_first, int k_first, int window) {
  return k_first + kTile - 1 > q_first || (window > 0 && q_first + kTile - 1 - k_first >= window);
}
// Key position u is seen from query position p (windows counted in positions).
__device__ bool key_allowed(int p, int u, int window) { return u <= p && (window == 0 || p - u < window); }

// x as bf16 hi + lo pairs (hi + lo carries ~16 mantissa bits of x).
__device__ void split_bf16(float2 x, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x.x, x.y);
  const float2 hf = __bfloat1622float2(h);
  hi = bits(h);
  lo = pack_bf16(x.x - hf.x, x.y - hf.y);
}

// Rows [first, first + 64) of one kv head of K or V into a padded shared tile (cp.async, the
// caller commits). head_rows: the head's row 0 of the sequence; rows past `length` are zero,
// so a masked key is 0 weight x 0 value, never garbage.
__device__ void load_kv_tile(uint16_t (*tile)[kRowPad], const __nv_bfloat16* head_rows, int64_t row_stride,
                             int first, int length) {
#pragma unroll
  for (int i = threadIdx.x; i < kTile * 8; i += kThreads) {
    const int row = i / 8;
    const int chunk = i % 8;
    const int u = first + row;
    const bool valid = u < length;
    copy_async16(shared_address(&tile[row][chunk * 8]), head_rows + (valid ? u * row_stride + chunk * 8 : 0), valid);
  }
}

struct ForwardShared {
  uint16_t k[2][kTile][kRowPad];  // bf16 bits
  uint16_t v[2][kTile][kRowPad];
};

// Grid (query tiles of the longest sequence, heads, n_seqs), kThreads threads.
// out [n, heads, 64] bf16; lse [n, heads] fp32 (natural log); q [n, heads, 64] fp32;
// k, v [n, kv_heads, 64] bf16; sinks [heads] fp32; seq_offsets [n_seqs + 1].
// Warp w owns the tile's queries 16w..16w+15; a thread rows lane/4 and lane/4 + 8 of them.
__global__ void __launch_bounds__(kThreads)
    flash_forward_kernel(__nv_bfloat16* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q,
                         const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                         const float* __restrict__ sinks, const int32_t* __restrict__ seq_offsets, int heads,
                         int kv_heads, int window) {
  __shared__ __align__(16) ForwardShared sh;
  const int begin = seq_offsets[blockIdx.z];
  const int length = seq_offsets[blockIdx.z + 1] - begin;
  // Under causality the last tiles see the most keys: launched first, they do not trail the grid.
  const int q_first = int(gridDim.x - 1 - blockIdx.x) * kTile;
  if (q_first >= length) return;
  const int head = blockIdx.y;
  const int kv_head = head / (heads / kv_heads);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // Rows' positions, softmax state (max m in log2 units, starting at the sink, whose
  // exp2(sink - m) = 1 one lane of the quad counts) and q as A fragments.
  int pos[2];
  float m[2], l[2];
  uint32_t q_hi[4][4], q_lo[4][4];
  const float sink = sinks[head] * kLog2e;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    pos[r] = q_first + warp * 16 + lane / 4 + 8 * r;
    m[r] = sink;
    l[r] = lane % 4 == 0 ? 1.0f : 0.0f;
    const bool valid = pos[r] < length;
    const float* q_row = q + (int64_t(begin + pos[r]) * heads + head) * kHeadDim;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float2 x = make_float2(0.0f, 0.0f);
        if (valid) x = *reinterpret_cast<const float2*>(q_row + ks * 16 + half * 8 + 2 * (lane % 4));
        split_bf16(make_float2(x.x * kQueryScale, x.y * kQueryScale), q_hi[ks][r + 2 * half], q_lo[ks][r + 2 * half]);
      }
    }
  }
  float o[kHeadDim / 8][4];
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

  const int64_t kv_stride = int64_t(kv_heads) * kHeadDim;
  const __nv_bfloat16* k_rows = k + int64_t(begin) * kv_stride + kv_head * kHeadDim;
  const __nv_bfloat16* v_rows = v + int64_t(begin) * kv_stride + kv_head * kHeadDim;
  const int first_tile = window > 0 ? max(0, q_first - window + 1) / kTile : 0;
  const int last_tile = q_first / kTile;  // the diagonal
  auto issue = [&](int tile, int buffer) {
    load_kv_tile(sh.k[buffer], k_rows, kv_stride, tile * kTile, length);
    load_kv_tile(sh.v[buffer], v_rows, kv_stride, tile * kTile, length);
  };
  issue(first_tile, 0);
  copy_async_commit();

  for (int tile = first_tile; tile <= last_tile; ++tile) {
    const int buffer = (tile - first_tile) % 2;
    __syncthreads();  // everyone is done with the other buffer (the previous tile)
    if (tile < last_tile) issue(tile + 1, buffer ^ 1);
    copy_async_commit();  // empty after the last tile: the group count stays uniform
    copy_async_wait<1>();
    __syncthreads();  // this tile has landed for everyone
    const uint16_t(*k_tile)[kRowPad] = sh.k[buffer];
    const uint16_t(*v_tile)[kRowPad] = sh.v[buffer];
    const int k_first = tile * kTile;
    // Every warp computes the whole tile, even on the diagonal where its rows see part of it:
    // skipping 16-key steps with warp-uniform branches measured slower on the H100 (16384
    // tokens: 11.6 -> 15.0 ms); the branches break up the unrolled loops' overlap.

    // S = Q K^T over 8 blocks of 8 keys; ldmatrix of K rows is the col-major B fragment.
    float s[kTile / 8][4];
    qk_scores_split(s, q_hi, q_lo, [&](int r) { return &k_tile[r][0]; }, lane);
    if (tile_needs_mask(q_first, k_first, window)) {
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!key_allowed(pos[e / 2], k_first + j * 8 + 2 * (lane % 4) + (e & 1), window)) s[j][e] = -INFINITY;
        }
      }
    }

    // Online softmax: a row whose keys are all masked here keeps m (finite: it started at the sink).
    float rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j) tile_max = fmaxf(tile_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float m_new = fmaxf(m[r], tile_max);
      rescale[r] = exp2f(m[r] - m_new);
      m[r] = m_new;
      l[r] *= rescale[r];
    }
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      o[n][0] *= rescale[0];
      o[n][1] *= rescale[0];
      o[n][2] *= rescale[1];
      o[n][3] *= rescale[1];
    }
    // P in bf16, whose accumulator layout is the A fragment of P V; l sums the rounded values,
    // so the weights the mma applies are the ones normalised.
    uint32_t p[kTile / 8][2];
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const __nv_bfloat162 pair =
            __floats2bfloat162_rn(exp2f(s[j][2 * r] - m[r]), exp2f(s[j][2 * r + 1] - m[r]));
        const float2 rounded = __bfloat1622float2(pair);
        l[r] += rounded.x + rounded.y;
        p[j][r] = bits(pair);
      }
    }
    // O += P V over k-steps of 16 keys; ldmatrix.trans turns V's key-major rows into B fragments.
#pragma unroll
    for (int ks = 0; ks < kTile / 16; ++ks) {
      const uint32_t a[4] = {p[2 * ks][0], p[2 * ks][1], p[2 * ks + 1][0], p[2 * ks + 1][1]};
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; n += 2) {
        uint32_t b[4];
        load_matrix_x4_trans(b, shared_address(&v_tile[ks * 16 + ((lane / 8) % 2) * 8 + lane % 8][(n + lane / 16) * 8]));
        mma_bf16(o[n], a, b[0], b[1]);
        mma_bf16(o[n + 1], a, b[2], b[3]);
      }
    }
  }

  __nv_bfloat162* out2 = reinterpret_cast<__nv_bfloat162*>(out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    if (pos[r] >= length) continue;
    const int64_t row = int64_t(begin + pos[r]) * heads + head;
    const float inv = 1.0f / l[r];
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      out2[(row * kHeadDim + n * 8 + 2 * (lane % 4)) / 2] = __floats2bfloat162_rn(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
    if (lane % 4 == 0) lse[row] = (m[r] + log2f(l[r])) * kLn2;
  }
}

// D = dout · out per (token, head) into d, and dq zeroed for the backward's atomics.
// rows = n * heads; 8 threads per row of 64, 8 dims each (a multiple of 8 threads per block,
// so a row's threads share a warp). dout [rows, 64] fp32; out [rows, 64] bf16.
__global__ void flash_backward_prepare_kernel(float* __restrict__ d, float* __restrict__ dq,
                                              const float* __restrict__ dout, const __nv_bfloat16* __restrict__ out,
                                              int64_t rows) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = i / 8;
  const int part = int(i % 8);
  float sum = 0.0f;
  if (row < rows) {
    const int64_t offset = row * kHeadDim + part * 8;
    const float4 g0 = *reinterpret_cast<const float4*>(dout + offset);
    const float4 g1 = *reinterpret_cast<const float4*>(dout + offset + 4);
    const uint4 packed = *reinterpret_cast<const uint4*>(out + offset);
    const __nv_bfloat162* o = reinterpret_cast<const __nv_bfloat162*>(&packed);
    const float2 o0 = __bfloat1622float2(o[0]), o1 = __bfloat1622float2(o[1]);
    const float2 o2 = __bfloat1622float2(o[2]), o3 = __bfloat1622float2(o[3]);
    sum = g0.x * o0.x + g0.y * o0.y + g0.z * o1.x + g0.w * o1.y + g1.x * o2.x + g1.y * o2.y + g1.z * o3.x +
          g1.w * o3.y;
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    *reinterpret_cast<float4*>(dq + offset) = zero;
    *reinterpret_cast<float4*>(dq + offset + 4) = zero;
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  sum += __shfl_xor_sync(0xffffffffu, sum, 4);
  if (row < rows && part == 0) d[row] = sum;
}

struct BackwardShared {
  // The next query tile as it arrives (fp32, cp.async; rows past the sequence zero), turned
  // into the bf16 tiles below at the top of its step.
  float q_in[kTile][kHeadDim];
  float dout_in[kTile][kHeadDim];
  float lse_in[kTile];
  float d_in[kTile];
  // The current query tile: q * kQueryScale as bf16 hi + lo, dout as bf16, lse in log2
  // units (+inf past the sequence, so P = 0 there) and D.
  uint16_t q_hi[kTile][kRowPad];
  uint16_t q_lo[kTile][kRowPad];
  uint16_t dout[kTile][kRowPad];
  float lse2[kTile];
  float d[kTile];
  // The CTA's keys (K stays for dQ = dS K; V only until its rows are in registers) and the
  // current dS^T / sqrt(64), [key][query].
  uint16_t k[kTile][kRowPad];
  uint16_t v[kTile][kRowPad];
  uint16_t ds[kTile][kRowPad];
};
constexpr size_t kBackwardSharedBytes = sizeof(BackwardShared);  // 88 KB: dynamic shared memory

// Grid (kv_heads, n_seqs, key tiles of the longest sequence), kThreads threads; shapes as in
// flash_attention_backward, d = D [n, heads]. Warp w owns the CTA's keys 16w..16w+15 (the
// rows of S^T, dP^T, dK, dV; a thread rows lane/4 and lane/4 + 8), and for dQ queries
// 16w..16w+15 of the current tile.
__global__ void __launch_bounds__(kThreads, 2)
    flash_backward_kernel(float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
                          const float* __restrict__ dout, const float* __restrict__ q,
                          const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                          const float* __restrict__ lse, const float* __restrict__ d,
                          const int32_t* __restrict__ seq_offsets, int heads, int kv_heads, int window) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  BackwardShared& sh = *reinterpret_cast<BackwardShared*>(shared_bytes);
  const int begin = seq_offsets[blockIdx.y];
  const int length = seq_offsets[blockIdx.y + 1] - begin;
  // Under causality the first key tiles are seen by the most queries: the tile is the grid's
  // slowest index, so they are launched first across all heads and sequences and the short
  // ones fill in behind them (launched head-major, long CTAs trailed the grid at 4 x 1024).
  const int k_first = blockIdx.z * kTile;
  if (k_first >= length) return;
  const int kv_head = blockIdx.x;
  const int group = heads / kv_heads;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // The query tiles that see some key of this tile: from the diagonal to the window's end.
  const int last_query = window > 0 ? min(length - 1, k_first + kTile - 1 + window - 1) : length - 1;
  const int first_q_tile = k_first / kTile;
  const int q_tiles = last_query / kTile - first_q_tile + 1;
  const int steps = group * q_tiles;  // (query head, query tile) pairs, head-major

  const int64_t kv_stride = int64_t(kv_heads) * kHeadDim;
  load_kv_tile(sh.k, k + int64_t(begin) * kv_stride + kv_head * kHeadDim, kv_stride, k_first, length);
  load_kv_tile(sh.v, v + int64_t(begin) * kv_stride + kv_head * kHeadDim, kv_stride, k_first, length);
  copy_async_commit();

  // Step `step`'s q, dout (16-byte pieces of 64 fp32 rows), lse and D into the *_in buffers.
  auto issue = [&](int step) {
    const int head = kv_head * group + step / q_tiles;
    const int q_first = (first_q_tile + step % q_tiles) * kTile;
#pragma unroll
    for (int i = threadIdx.x; i < kTile * kHeadDim / 4; i += kThreads) {
      const int row = i / (kHeadDim / 4);
      const int chunk = i % (kHeadDim / 4);
      const bool valid = q_first + row < length;
      const int64_t offset = valid ? (int64_t(begin + q_first + row) * heads + head) * kHeadDim + chunk * 4 : 0;
      copy_async16(shared_address(&sh.q_in[row][chunk * 4]), q + offset, valid);
      copy_async16(shared_address(&sh.dout_in[row][chunk * 4]), dout + offset, valid);
    }
    if (threadIdx.x < 2 * kTile) {
      const int row = threadIdx.x % kTile;
      const bool valid = q_first + row < length;
      const int64_t offset = valid ? int64_t(begin + q_first + row) * heads + head : 0;
      const bool is_lse = threadIdx.x < kTile;
      copy_async4(shared_address(is_lse ? &sh.lse_in[row] : &sh.d_in[row]), (is_lse ? lse : d) + offset, valid);
    }
    copy_async_commit();
  };
  issue(0);

  copy_async_wait<1>();  // K and V have landed (step 0's group may still be in flight)
  __syncthreads();
  // This warp's 16 keys as A fragments (rows keys, columns dims): K for S^T, V for dP^T.
  const int key_row = warp * 16;
  uint32_t k_frag[4][4], v_frag[4][4];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    load_matrix_x4(k_frag[ks], shared_address(&sh.k[key_row + lane % 16][ks * 16 + (lane / 16) * 8]));
    load_matrix_x4(v_frag[ks], shared_address(&sh.v[key_row + lane % 16][ks * 16 + (lane / 16) * 8]));
  }
  float dk_acc[kHeadDim / 8][4], dv_acc[kHeadDim / 8][4];
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) {
    dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.0f;
    dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.0f;
  }
  const int u0 = k_first + key_row + lane / 4;  // this thread's keys: u0 and u0 + 8

  for (int step = 0; step < steps; ++step) {
    const int head = kv_head * group + step / q_tiles;
    const int q_first = (first_q_tile + step % q_tiles) * kTile;
    copy_async_wait<0>();
    __syncthreads();  // the tile has landed for everyone; nobody reads the previous step's tiles
#pragma unroll
    for (int i = threadIdx.x; i < kTile * kHeadDim / 4; i += kThreads) {
      const int row = i / (kHeadDim / 4);
      const int col = (i % (kHeadDim / 4)) * 4;
      const float4 x = *reinterpret_cast<const float4*>(&sh.q_in[row][col]);
      const float4 g = *reinterpret_cast<const float4*>(&sh.dout_in[row][col]);
      uint2 hi, lo;
      split_bf16(make_float2(x.x * kQueryScale, x.y * kQueryScale), hi.x, lo.x);
      split_bf16(make_float2(x.z * kQueryScale, x.w * kQueryScale), hi.y, lo.y);
      *reinterpret_cast<uint2*>(&sh.q_hi[row][col]) = hi;
      *reinterpret_cast<uint2*>(&sh.q_lo[row][col]) = lo;
      *reinterpret_cast<uint2*>(&sh.dout[row][col]) = make_uint2(pack_bf16(g.x, g.y), pack_bf16(g.z, g.w));
    }
    if (threadIdx.x < kTile) {
      const int row = threadIdx.x;
      sh.lse2[row] = q_first + row < length ? sh.lse_in[row] * kLog2e : INFINITY;
      sh.d[row] = sh.d_in[row];
    }
    __syncthreads();  // the bf16 tiles are ready; the *_in buffers are free
    if (step + 1 < steps) issue(step + 1);

    const bool masked = tile_needs_mask(q_first, k_first, window);
    // 32 queries at a time, so fewer score accumulators are live.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // S^T = K Q^T (hi + lo) and dP^T = V dO^T over 4 blocks of 8 queries; ldmatrix of the
      // query rows is the col-major B fragment.
      float s[4][4], dp[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
        dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.0f;
        const int query_row = half * 32 + j * 8 + lane % 8;
        const int dim = (lane / 8) * 8;
        uint32_t hi[2][4], lo[2][4], g[2][4];
        load_matrix_x4(hi[0], shared_address(&sh.q_hi[query_row][dim]));
        load_matrix_x4(hi[1], shared_address(&sh.q_hi[query_row][dim + 32]));
        load_matrix_x4(lo[0], shared_address(&sh.q_lo[query_row][dim]));
        load_matrix_x4(lo[1], shared_address(&sh.q_lo[query_row][dim + 32]));
        load_matrix_x4(g[0], shared_address(&sh.dout[query_row][dim]));
        load_matrix_x4(g[1], shared_address(&sh.dout[query_row][dim + 32]));
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          mma_bf16(s[j], k_frag[ks], hi[ks / 2][(ks % 2) * 2], hi[ks / 2][(ks % 2) * 2 + 1]);
          mma_bf16(s[j], k_frag[ks], lo[ks / 2][(ks % 2) * 2], lo[ks / 2][(ks % 2) * 2 + 1]);
          mma_bf16(dp[j], v_frag[ks], g[ks / 2][(ks % 2) * 2], g[ks / 2][(ks % 2) * 2 + 1]);
        }
      }
      // P^T = exp(S^T - lse) (0 where masked) and dS^T / sqrt(64) = P^T (dP^T - D) / 8, as
      // bf16 A fragments; dS^T also to shared memory for dQ.
      uint32_t p_frag[4][2], ds_frag[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = half * 32 + j * 8 + 2 * (lane % 4);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float pr[2], dsr[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float pe = exp2f(s[j][2 * r + e] - sh.lse2[col + e]);
            if (masked && !key_allowed(q_first + col + e, u0 + 8 * r, window)) pe = 0.0f;
            pr[e] = pe;
            dsr[e] = pe * (dp[j][2 * r + e] - sh.d[col + e]) * kInvSqrtHeadDim;
          }
          p_frag[j][r] = pack_bf16(pr[0], pr[1]);
          ds_frag[j][r] = pack_bf16(dsr[0], dsr[1]);
          *reinterpret_cast<uint32_t*>(&sh.ds[key_row + lane / 4 + 8 * r][col]) = ds_frag[j][r];
        }
      }
      // dV += P^T dO and dK += dS^T (q * kQueryScale) over k-steps of 16 queries;
      // ldmatrix.trans turns the query-major rows into B fragments.
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        const uint32_t a_p[4] = {p_frag[2 * kk][0], p_frag[2 * kk][1], p_frag[2 * kk + 1][0], p_frag[2 * kk + 1][1]};
        const uint32_t a_ds[4] = {ds_frag[2 * kk][0], ds_frag[2 * kk][1], ds_frag[2 * kk + 1][0],
                                  ds_frag[2 * kk + 1][1]};
        const int query_row = half * 32 + kk * 16 + ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
        for (int n = 0; n < kHeadDim / 8; n += 2) {
          uint32_t b[4];
          load_matrix_x4_trans(b, shared_address(&sh.dout[query_row][(n + lane / 16) * 8]));
          mma_bf16(dv_acc[n], a_p, b[0], b[1]);
          mma_bf16(dv_acc[n + 1], a_p, b[2], b[3]);
          load_matrix_x4_trans(b, shared_address(&sh.q_hi[query_row][(n + lane / 16) * 8]));
          mma_bf16(dk_acc[n], a_ds, b[0], b[1]);
          mma_bf16(dk_acc[n + 1], a_ds, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // dS^T is complete

    // dQ = (dS / sqrt(64)) K for queries 16w..16w+15: A from dS^T by ldmatrix.trans (rows
    // queries, columns keys), B from K's key-major rows by ldmatrix.trans.
    float dq_acc[kHeadDim / 8][4];
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) dq_acc[n][0] = dq_acc[n][1] = dq_acc[n][2] = dq_acc[n][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kTile / 16; ++ks) {
      uint32_t a[4];
      load_matrix_x4_trans(a, shared_address(&sh.ds[ks * 16 + (lane / 16) * 8 + lane % 8][warp * 16 + ((lane / 8) % 2) * 8]));
      const int key = ks * 16 + ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; n += 2) {
        uint32_t b[4];
        load_matrix_x4_trans(b, shared_address(&sh.k[key][(n + lane / 16) * 8]));
        mma_bf16(dq_acc[n], a, b[0], b[1]);
        mma_bf16(dq_acc[n + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int p = q_first + warp * 16 + lane / 4 + 8 * r;
      if (p >= length) continue;
      float* dq_row = dq + (int64_t(begin + p) * heads + head) * kHeadDim + 2 * (lane % 4);
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        atomicAdd(reinterpret_cast<float2*>(dq_row + n * 8), make_float2(dq_acc[n][2 * r], dq_acc[n][2 * r + 1]));
      }
    }
  }

  // dK was accumulated against q * kQueryScale: undo the scale. Every key of the sequence is
  // some CTA's, so dk and dv are overwritten whole.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int u = u0 + 8 * r;
    if (u >= length) continue;
    const int64_t offset = int64_t(begin + u) * kv_stride + kv_head * kHeadDim + 2 * (lane % 4);
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      *reinterpret_cast<float2*>(dk + offset + n * 8) =
          make_float2(dk_acc[n][2 * r] / kQueryScale, dk_acc[n][2 * r + 1] / kQueryScale);
      *reinterpret_cast<float2*>(dv + offset + n * 8) = make_float2(dv_acc[n][2 * r], dv_acc[n][2 * r + 1]);
    }
  }
}

// dsinks[h] += -Σ_t exp(sinks[h] - lse[t, h]) D[t, h]: one CTA per head, partial sums in a
// fixed order (deterministic, no atomics). lse, d [n, heads].
__global__ void __launch_bounds__(kSinkThreads)
    flash_sink_grad_kernel(float* __restrict__ dsinks, const float* __restrict__ sinks, const float* __restrict__ lse,
                           const float* __restrict__ d, int n, int heads) {
  __shared__ float warp_sums[kSinkThreads / 32];
  const int head = blockIdx.x;
  const float sink = sinks[head];
  float sum = 0.0f;
  for (int t = threadIdx.x; t < n; t += kSinkThreads) {
    const int64_t i = int64_t(t) * heads + head;
    sum += expf(sink - lse[i]) * d[i];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kSinkThreads / 32; ++w) total += warp_sums[w];
    dsinks[head] -= total;
  }
}

void check_shape(const FlashAttentionShape& shape, const char* who) {
  if (shape.head_dim != kHeadDim) fail_cuda(cudaErrorInvalidValue, who, __FILE__, __LINE__);
  if (shape.kv_heads <= 0 || shape.heads <= 0 || shape.heads % shape.kv_heads != 0 || shape.heads > 65535) {
    fail_cuda(cudaErrorInvalidValue, who, __FILE__, __LINE__);
  }
  // Grid y holds the sequences, and the backward's z the key tiles: at most 65535 each.
  if (shape.sliding_window < 0 || shape.n_seqs < 0 || shape.n_seqs > 65535 || shape.n_tokens < 0 ||
      shape.max_seq_len < 0 || shape.max_seq_len > 65535 * kTile) {
    fail_cuda(cudaErrorInvalidValue, who, __FILE__, __LINE__);
  }
}

bool empty(const FlashAttentionShape& shape) {
  return shape.n_seqs == 0 || shape.n_tokens == 0 || shape.max_seq_len == 0;
}

unsigned tiles(int length) { return unsigned((length + kTile - 1) / kTile); }

}  // namespace

void flash_attention_forward(__nv_bfloat16* out, float* lse, const float* q, const __nv_bfloat16* k,
                             const __nv_bfloat16* v, const float* sinks, const FlashAttentionShape& shape,
                             cudaStream_t stream) {
  check_shape(shape,
              "flash_attention_forward: head_dim must be 64, heads a multiple of kv_heads, counts and the window >= 0");
  if (empty(shape)) return;
  const dim3 grid(tiles(shape.max_seq_len), unsigned(shape.heads), unsigned(shape.n_seqs));
  flash_forward_kernel<<<grid, kThreads, 0, stream>>>(out, lse, q, k, v, sinks, shape.seq_offsets, shape.heads,
                                                      shape.kv_heads, shape.sliding_window);
  OSSRL_CUDA_CHECK_LAUNCH();
}

void flash_attention_backward(float* dq, float* dk, float* dv, float* dsinks, float* scratch, const float* dout,
                              const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* sinks,
                              const __nv_bfloat16* out, const float* lse, const FlashAttentionShape& shape,
                              cudaStream_t stream) {
  check_shape(shape,
              "flash_attention_backward: head_dim must be 64, heads a multiple of kv_heads, counts and the window >= 0");
  if (empty(shape)) return;
  const int64_t rows = int64_t(shape.n_tokens) * shape.heads;
  constexpr int kPrepareThreads = 256;
  flash_backward_prepare_kernel<<<unsigned((rows * 8 + kPrepareThreads - 1) / kPrepareThreads), kPrepareThreads, 0,
                                  stream>>>(scratch, dq, dout, out, rows);
  OSSRL_CUDA_CHECK_LAUNCH();

  // Above the 48 KB default: an attribute of the function, no stream work (capture-safe).
  OSSRL_CUDA_CHECK(cudaFuncSetAttribute(flash_backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(kBackwardSharedBytes)));
  const dim3 grid(unsigned(shape.kv_heads), unsigned(shape.n_seqs), tiles(shape.max_seq_len));
  flash_backward_kernel<<<grid, kThreads, kBackwardSharedBytes, stream>>>(
      dq, dk, dv, dout, q, k, v, lse, scratch, shape.seq_offsets, shape.heads, shape.kv_heads, shape.sliding_window);
  OSSRL_CUDA_CHECK_LAUNCH();

  if (dsinks != nullptr) {
    flash_sink_grad_kernel<<<unsigned(shape.heads), kSinkThreads, 0, stream>>>(dsinks, sinks, lse, scratch,
                                                                               shape.n_tokens, shape.heads);
    OSSRL_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace ossrl::cuda
