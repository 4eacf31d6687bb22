// Paged causal GQA attention with sinks and sliding windows (cuda/attention.h).
//
// One cluster of CTAs per (query tile, kv head): its rows are the tile's queries x the query
// heads of that kv head's group (up to 16 x 8 = 128), so each K/V row read from the cache
// serves all of them. Keys stream through shared memory 32 at a time (one per lane); each warp
// keeps an online softmax per row. When the grid is too small to fill the GPU (decode of few
// sequences) the key tiles are dealt out over the CTAs of a cluster (flash-decoding) and the
// partial softmax states are merged through distributed shared memory, so nothing outside
// the kernel's arguments is allocated and the launch is graph capturable.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention.h"
#include "cuda/check.h"

namespace ossrl::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kHeadDim = 64;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kKeyTile = 32;  // one key per lane
constexpr int kMaxGroup = 8;  // query heads per kv head (gpt-oss: 64 / 8)
constexpr int kMaxRows = kAttentionTileQueries * kMaxGroup;
constexpr int kMaxRowsPerWarp = kMaxRows / kWarps;
// K rows padded by 16 bytes: lane j reads row j with 16-byte loads, and a quarter warp's
// eight rows then fall on distinct banks.
constexpr int kKeyStride = kHeadDim + 4;
constexpr int kMaxSplits = 8;  // portable cluster size
constexpr float kLog2e = 1.4426950408889634f;

// 47.6 KB: fits the 48 KB of static shared memory, two CTAs per SM.
struct __align__(16) SharedTiles {
  // Query rows, pre-scaled by log2(e)/sqrt(head_dim) so scores come out in log2 units; after
  // the key loop row r holds that row's unnormalised output instead (for the merge).
  float q[kMaxRows][kHeadDim];
  float k[kKeyTile][kKeyStride];                // fp32: read once per row per tile
  __nv_bfloat162 v[kKeyTile][kHeadDim / 2];      // lane reads its 2 dims of each key
  float p[kWarps][kKeyTile];                     // one row's probabilities, broadcast to the warp
  float row_max[kMaxRows];                       // softmax state per row after the key loop
  float row_sum[kMaxRows];
};

__device__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Grid (n_tiles, kv_heads, splits), cluster (1, 1, splits), kThreads threads.
// out [n_queries, heads, 64] bf16; q [n_queries, heads, 64] fp32; sinks [heads] fp32;
// kv.k / kv.v [slots, kv_heads, 64] bf16. Row r of a CTA is query t = r / group of the tile
// and query head h = kv_head * group + r % group; warp w owns rows w, w + 8, ...
__global__ void __launch_bounds__(kThreads, 2)
    paged_attention_kernel(__nv_bfloat16* __restrict__ out, const float* __restrict__ q, PagedKv kv,
                           const float* __restrict__ sinks, const int32_t* __restrict__ query_pos,
                           const QueryTile* __restrict__ tiles, int heads, int kv_heads,
                           int sliding_window) {
  __shared__ SharedTiles sh;
  const QueryTile tile = tiles[blockIdx.x];
  // A padding tile: the whole cluster (same blockIdx.x) leaves before any cluster barrier.
  if (tile.count <= 0) return;
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = int(cluster.num_blocks());
  const int split = int(cluster.block_rank());
  const int kv_head = blockIdx.y;
  const int group = heads / kv_heads;
  const int rows = tile.count * group;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  const int first_pos = query_pos[tile.first_query];
  const int key_begin = sliding_window > 0 ? max(0, first_pos - sliding_window + 1) : 0;
  const int key_end = first_pos + tile.count;  // one past the last query's position
  const int n_key_tiles = (key_end - key_begin + kKeyTile - 1) / kKeyTile;

  // exp2 below needs log2 units: fold log2(e) and 1/sqrt(64) into q once.
  const float q_scale = kLog2e / sqrtf(float(kHeadDim));
  for (int i = threadIdx.x; i < rows * (kHeadDim / 4); i += kThreads) {
    const int r = i / (kHeadDim / 4);
    const int c = i % (kHeadDim / 4);
    const int64_t row = int64_t(tile.first_query + r / group) * heads + kv_head * group + r % group;
    const float4 x = reinterpret_cast<const float4*>(q + row * kHeadDim)[c];
    reinterpret_cast<float4*>(sh.q[r])[c] = make_float4(x.x * q_scale, x.y * q_scale, x.z * q_scale, x.w * q_scale);
  }

  // Thread i fetches 16 bytes (8 dims) of key i / 8's K and V rows.
  const int fetch_key = threadIdx.x / 8;
  const int fetch_chunk = threadIdx.x % 8;
  const int32_t* block_table = kv.block_tables + int64_t(tile.seq) * kv.max_pages_per_seq;
  auto fetch = [&](int key_tile, uint4* k_chunk, uint4* v_chunk) {
    const int u = key_begin + key_tile * kKeyTile + fetch_key;
    if (u < key_end) {
      const int64_t slot = int64_t(block_table[u / kv.page_size]) * kv.page_size + u % kv.page_size;
      const int64_t offset = (slot * kv_heads + kv_head) * kHeadDim + fetch_chunk * 8;
      *k_chunk = *reinterpret_cast<const uint4*>(kv.k + offset);
      *v_chunk = *reinterpret_cast<const uint4*>(kv.v + offset);
    } else {
      // Past the last position: zeros, so a masked key's value is 0 x 0, never 0 x garbage.
      *k_chunk = make_uint4(0, 0, 0, 0);
      *v_chunk = make_uint4(0, 0, 0, 0);
    }
  };
  auto stage = [&](const uint4& k_chunk, const uint4& v_chunk) {
    const __nv_bfloat162* k2 = reinterpret_cast<const __nv_bfloat162*>(&k_chunk);
    float4* k_dst = reinterpret_cast<float4*>(&sh.k[fetch_key][fetch_chunk * 8]);
    const float2 a = __bfloat1622float2(k2[0]), b = __bfloat1622float2(k2[1]);
    const float2 c = __bfloat1622float2(k2[2]), d = __bfloat1622float2(k2[3]);
    k_dst[0] = make_float4(a.x, a.y, b.x, b.y);
    k_dst[1] = make_float4(c.x, c.y, d.x, d.y);
    *reinterpret_cast<uint4*>(&sh.v[fetch_key][fetch_chunk * 4]) = v_chunk;
  };

  // Per row: running max m (log2 units) starts at the sink's logit, so it is always finite
  // and a fully masked tile changes nothing; the sum l is kept per lane (reduced once at the
  // end) and the sink's exp2(sink - m) = 1 is counted once, by lane 0 of split 0.
  float m[kMaxRowsPerWarp], l[kMaxRowsPerWarp];
  float2 acc[kMaxRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kMaxRowsPerWarp; ++i) {
    const int r = warp + i * kWarps;
    m[i] = r < rows ? sinks[kv_head * group + r % group] * kLog2e : 0.0f;
    l[i] = lane == 0 && split == 0 ? 1.0f : 0.0f;
    acc[i] = make_float2(0.0f, 0.0f);
  }

  // Key tiles split, split + splits, ...: the next tile's global loads are in flight while
  // this one is computed.
  uint4 k_next, v_next;
  if (split < n_key_tiles) fetch(split, &k_next, &v_next);
  for (int key_tile = split; key_tile < n_key_tiles; key_tile += splits) {
    __syncthreads();  // every warp is done with the previous tile
    stage(k_next, v_next);
    __syncthreads();
    if (key_tile + splits < n_key_tiles) fetch(key_tile + splits, &k_next, &v_next);

    const int u0 = key_begin + key_tile * kKeyTile;
    const int u = u0 + lane;
    const float4* k_row = reinterpret_cast<const float4*>(sh.k[lane]);
#pragma unroll
    for (int i = 0; i < kMaxRowsPerWarp; ++i) {
      const int r = warp + i * kWarps;
      if (r >= rows) break;
      const int p = first_pos + r / group;
      const int lo = sliding_window > 0 ? max(0, p - sliding_window + 1) : 0;
      if (u0 > p || u0 + kKeyTile - 1 < lo) continue;  // this row sees none of the tile

      const float4* q_row = reinterpret_cast<const float4*>(sh.q[r]);
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma unroll
      for (int c = 0; c < kHeadDim / 4; ++c) {
        const float4 a = q_row[c], b = k_row[c];
        s0 = fmaf(a.x, b.x, s0);
        s1 = fmaf(a.y, b.y, s1);
        s2 = fmaf(a.z, b.z, s2);
        s3 = fmaf(a.w, b.w, s3);
      }
      const float s = u >= lo && u <= p ? (s0 + s1) + (s2 + s3) : -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(s));
      const float rescale = exp2f(m[i] - m_new);
      const float prob = exp2f(s - m_new);
      m[i] = m_new;
      l[i] = l[i] * rescale + prob;

      sh.p[warp][lane] = prob;
      __syncwarp();
      float2 o = make_float2(acc[i].x * rescale, acc[i].y * rescale);
#pragma unroll
      for (int j = 0; j < kKeyTile; j += 4) {
        const float4 pj = *reinterpret_cast<const float4*>(&sh.p[warp][j]);
        const float2 v0 = __bfloat1622float2(sh.v[j][lane]), v1 = __bfloat1622float2(sh.v[j + 1][lane]);
        const float2 v2 = __bfloat1622float2(sh.v[j + 2][lane]), v3 = __bfloat1622float2(sh.v[j + 3][lane]);
        o.x = fmaf(pj.x, v0.x, fmaf(pj.y, v1.x, fmaf(pj.z, v2.x, fmaf(pj.w, v3.x, o.x))));
        o.y = fmaf(pj.x, v0.y, fmaf(pj.y, v1.y, fmaf(pj.z, v2.y, fmaf(pj.w, v3.y, o.y))));
      }
      acc[i] = o;
      __syncwarp();  // the next row overwrites sh.p[warp]
    }
  }

  // Publish each row's state (m, l, unnormalised out) in this CTA's shared memory; a row's q
  // slot is free now (only its own warp read it).
#pragma unroll
  for (int i = 0; i < kMaxRowsPerWarp; ++i) {
    const int r = warp + i * kWarps;
    if (r >= rows) break;
    const float sum = warp_sum(l[i]);
    reinterpret_cast<float2*>(sh.q[r])[lane] = acc[i];
    if (lane == 0) {
      sh.row_max[r] = m[i];
      sh.row_sum[r] = sum;
    }
  }
  cluster.sync();

  // Merge the splits' states, rows dealt out over the cluster's warps:
  //   M = max m_s;  out = Σ_s 2^(m_s - M) acc_s / Σ_s 2^(m_s - M) l_s.
  __nv_bfloat162* out2 = reinterpret_cast<__nv_bfloat162*>(out);
  for (int r = split + splits * warp; r < rows; r += splits * kWarps) {
    float m_all = -INFINITY;
    for (int s = 0; s < splits; ++s) m_all = fmaxf(m_all, cluster.map_shared_rank(&sh, s)->row_max[r]);
    float sum = 0.0f;
    float2 o = make_float2(0.0f, 0.0f);
    for (int s = 0; s < splits; ++s) {
      const SharedTiles* part = cluster.map_shared_rank(&sh, s);
      const float w = exp2f(part->row_max[r] - m_all);
      const float2 a = reinterpret_cast<const float2*>(part->q[r])[lane];
      sum += w * part->row_sum[r];
      o.x += w * a.x;
      o.y += w * a.y;
    }
    const float inv = 1.0f / sum;
    const int64_t row = int64_t(tile.first_query + r / group) * heads + kv_head * group + r % group;
    out2[row * (kHeadDim / 2) + lane] = __floats2bfloat162_rn(o.x * inv, o.y * inv);
  }
  cluster.sync();  // no CTA leaves while another still reads its shared memory
}

}  // namespace

void paged_attention_forward(__nv_bfloat16* out, const float* q, const PagedKv& kv, const float* sinks,
                             const int32_t* query_pos, const QueryTile* tiles, int n_tiles, int heads,
                             int kv_heads, int head_dim, int sliding_window, cudaStream_t stream) {
  if (head_dim != kHeadDim) {
    fail_cuda(cudaErrorInvalidValue, "paged_attention_forward: head_dim must be 64", __FILE__, __LINE__);
  }
  if (kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > kMaxGroup) {
    fail_cuda(cudaErrorInvalidValue,
              "paged_attention_forward: heads must be a multiple of kv_heads, at most 8 per kv head",
              __FILE__, __LINE__);
  }
  if (sliding_window < 0 || kv.page_size <= 0) {
    fail_cuda(cudaErrorInvalidValue, "paged_attention_forward: sliding_window >= 0 and page_size > 0",
              __FILE__, __LINE__);
  }
  if (n_tiles == 0) return;

  // Split the keys over a cluster only while the (tile, kv head) CTAs alone leave SMs idle:
  // two CTAs are resident per SM. Attribute queries are no stream work, so capture is unaffected.
  int device = 0, sms = 0;
  OSSRL_CUDA_CHECK(cudaGetDevice(&device));
  OSSRL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t resident = 2 * int64_t(sms);
  const int64_t ctas = int64_t(n_tiles) * kv_heads;
  int splits = 1;
  while (splits < kMaxSplits && ctas * splits * 2 <= resident) splits *= 2;

  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(n_tiles), unsigned(kv_heads), unsigned(splits));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 1;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = unsigned(splits);
  config.attrs = &cluster;
  config.numAttrs = 1;
  OSSRL_CUDA_CHECK(cudaLaunchKernelEx(&config, paged_attention_kernel, out, q, kv, sinks, query_pos, tiles,
                                      heads, kv_heads, sliding_window));
}

}  // namespace ossrl::cuda
