// Paged causal GQA attention with sinks and sliding windows (cuda/attention.h), on tensor cores.
//
// One cluster of CTAs per (query tile, kv head). Its rows are the tile's queries x the query
// heads of that kv head's group (up to 16 x 8 = 128), so each K/V row read from the cache
// serves all of them. Keys stream through shared memory 64 at a time (cp.async, a ring
// of 4 stages); a warp owns one 16-row tile and a slice of each stage's keys, computes
// S = Q K^T and O += P V with bf16 mma.sync (fp32 accumulation) and keeps an online softmax
// per row. q arrives in fp32 and is split into bf16 hi + lo halves (two mmas), so the scores
// carry ~16 mantissa bits, not bf16's 8; P is rounded to bf16 like flash attention's.
//
// Warps that share a row tile (decode has a single tile of 8 rows), the CTAs of a cluster
// (keys dealt out when the grid alone would leave SMs idle: flash-decoding) each hold a
// partial softmax state; they are merged through (distributed) shared memory at the end, so
// nothing beyond the arguments is allocated and the launch is graph capturable.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention.h"
#include "cuda/check.h"
#include "cuda/mma.cuh"

namespace ossrl::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kHeadDim = 64;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowTile = 16;  // rows per warp: the mma's m
constexpr int kMaxGroup = kWarps * kRowTile / kAttentionTileQueries;  // query heads per kv head
constexpr int kStageKeys = 64;
// Stages in flight: decode is a pure stream of K/V, so 3 stages load while one is used.
constexpr int kStages = 4;
// K/V rows in shared memory padded to 144 bytes: the 8 rows an ldmatrix phase reads fall on
// distinct banks.
constexpr int kRowPad = kHeadDim + 8;
constexpr int kMergePad = kHeadDim + 8;
constexpr int kMaxSplits = 8;  // portable cluster size
constexpr float kLog2e = 1.4426950408889634f;

struct StageBuffers {
  uint16_t k[kStages][kStageKeys][kRowPad];  // bf16 bits
  uint16_t v[kStages][kStageKeys][kRowPad];
};
// After the key loop: each warp's partial state for its 16 rows; after the merge of the
// slices, row tile t's merged state sits in slot t.
struct MergeBuffers {
  float o[kWarps][kRowTile][kMergePad];  // unnormalised output
  float m[kWarps][kRowTile];             // running max, log2 units
  float l[kWarps][kRowTile];             // sum of exp2(s - m), sink included once
};
union __align__(16) SharedMemory {
  StageBuffers stage;
  MergeBuffers merge;
};
constexpr size_t kSharedBytes = sizeof(SharedMemory);  // 72 KB: dynamic shared memory


// One warp's softmax state, in mma fragment layout: this thread holds rows lane/4 (index 0)
// and lane/4 + 8 (index 1) of the warp's tile, and of each 8-wide dim block n the columns
// n*8 + 2*(lane%4) + {0, 1}.
struct RowState {
  float o[kHeadDim / 8][4];  // [dim block][c0, c1 (row 0), c2, c3 (row 1)]
  float m[2];
  float l[2];      // this thread's share: its quad's four lanes add up at the end
  int pos[2];      // the row's query position; -1 for a padding row (sees no key)
  int oldest[2];   // the oldest key position the row sees
};

// Scores, softmax update and P V for kTiles * 8 keys of a stage, starting at stage row
// `first` (position u_first), against the warp's 16 rows.
// Keys the warp's rows see lie in [oldest, newest]: slices outside are skipped (warp-uniform).
template <int kTiles>
__device__ void attend_keys(RowState& st, const uint32_t (&q_hi)[4][4], const uint32_t (&q_lo)[4][4],
                            const uint16_t (*k)[kRowPad], const uint16_t (*v)[kRowPad], int first, int u_first,
                            int oldest, int newest, int lane) {
  if (u_first > newest || u_first + kTiles * 8 - 1 < oldest) return;
  // S = Q K^T: ldmatrix of K rows (keys) gives the col-major B fragment directly.
  float s[kTiles][4];
  qk_scores_split(s, q_hi, q_lo, [&](int r) { return &k[first + r][0]; }, lane);

  // Causality and the window, then the online softmax update per row.
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int u = u_first + j * 8 + 2 * (lane % 4) + (e & 1);
      const int r = e / 2;
      if (u < st.oldest[r] || u > st.pos[r]) s[j][e] = -INFINITY;
      tile_max[r] = fmaxf(tile_max[r], s[j][e]);
    }
  }
  float rescale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
    const float m_new = fmaxf(st.m[r], tile_max[r]);  // finite: m starts at the sink
    rescale[r] = exp2f(st.m[r] - m_new);
    st.m[r] = m_new;
    st.l[r] *= rescale[r];
  }
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) {
    st.o[n][0] *= rescale[0];
    st.o[n][1] *= rescale[0];
    st.o[n][2] *= rescale[1];
    st.o[n][3] *= rescale[1];
  }
  // P in bf16, laid out as the A fragment of the P V mma (the S accumulator layout is it);
  // l sums the rounded values so the weights the mma applies are the ones normalised.
  uint32_t p[kTiles][2];
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const __nv_bfloat162 pair =
          __floats2bfloat162_rn(exp2f(s[j][2 * r] - st.m[r]), exp2f(s[j][2 * r + 1] - st.m[r]));
      const float2 rounded = __bfloat1622float2(pair);
      st.l[r] += rounded.x + rounded.y;
      p[j][r] = bits(pair);
    }
  }

  // O += P V over k-steps of 16 keys; ldmatrix.trans turns V's key-major rows into the B
  // fragment. A single 8-key tile fills half a k-step, the other half weighted 0 (those V
  // rows are another warp's keys of the same stage, finite).
  constexpr int kSteps = (kTiles + 1) / 2;
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks) {
    uint32_t a[4];
    int key0;
    if constexpr (kTiles == 1) {
      const bool upper = (first & 8) != 0;
      key0 = first & ~15;
      a[0] = upper ? 0u : p[0][0];
      a[1] = upper ? 0u : p[0][1];
      a[2] = upper ? p[0][0] : 0u;
      a[3] = upper ? p[0][1] : 0u;
    } else {
      key0 = first + ks * 16;
      a[0] = p[2 * ks][0];
      a[1] = p[2 * ks][1];
      a[2] = p[2 * ks + 1][0];
      a[3] = p[2 * ks + 1][1];
    }
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; n += 2) {
      uint32_t b[4];
      load_matrix_x4_trans(b, shared_address(&v[key0 + ((lane / 8) % 2) * 8 + lane % 8][(n + lane / 16) * 8]));
      mma_bf16(st.o[n], a, b[0], b[1]);
      mma_bf16(st.o[n + 1], a, b[2], b[3]);
    }
  }
}

// Grid (n_tiles, kv_heads, splits), cluster (1, 1, splits), kThreads threads.
// out [n_queries, heads, 64] bf16; q [n_queries, heads, 64] fp32; sinks [heads] fp32;
// kv.k / kv.v [slots, kv_heads, 64] bf16. CTA row r is query t = r / group of the tile and
// query head kv_head * group + r % group. Warp w takes row tile w % row_tiles and key slice
// w / row_tiles of each stage: 8 warps = row_tiles x slices (slices a power of two).
__global__ void __launch_bounds__(kThreads, 2)
    paged_attention_kernel(__nv_bfloat16* __restrict__ out, const float* __restrict__ q, PagedKv kv,
                           const float* __restrict__ sinks, const int32_t* __restrict__ query_pos,
                           const QueryTile* __restrict__ tiles, int heads, int kv_heads,
                           int sliding_window) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  SharedMemory& sh = *reinterpret_cast<SharedMemory*>(shared_bytes);
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
  const int row_tiles = (rows + kRowTile - 1) / kRowTile;
  const int slices = row_tiles == 1 ? 8 : row_tiles == 2 ? 4 : row_tiles <= 4 ? 2 : 1;
  const bool active = warp < row_tiles * slices;
  const int row_tile = warp % row_tiles;
  const int slice = warp / row_tiles;

  const int first_pos = query_pos[tile.first_query];
  const int key_begin = sliding_window > 0 ? max(0, first_pos - sliding_window + 1) : 0;
  const int key_end = first_pos + tile.count;  // one past the last query's position
  const int n_stages = (key_end - key_begin + kStageKeys - 1) / kStageKeys;

  // This thread's two rows: position, window, sink, and q split into bf16 hi + lo A
  // fragments, pre-scaled by log2(e)/sqrt(64) so the scores come out in log2 units.
  RowState st;
  uint32_t q_hi[4][4], q_lo[4][4];
  const float q_scale = kLog2e / sqrtf(float(kHeadDim));
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_tile * kRowTile + lane / 4 + 8 * r;
    const bool valid = active && row < rows;
    const int pos = first_pos + row / group;
    st.pos[r] = valid ? pos : -1;
    st.oldest[r] = sliding_window > 0 ? max(0, pos - sliding_window + 1) : 0;
    st.m[r] = valid ? sinks[kv_head * group + row % group] * kLog2e : 0.0f;
    // The sink's exp2(sink - m) = 1, counted once: by one lane of the quad, slice 0, split 0.
    st.l[r] = valid && lane % 4 == 0 && slice == 0 && split == 0 ? 1.0f : 0.0f;
    const float* q_row = q + (int64_t(tile.first_query + row / group) * heads + kv_head * group + row % group) * kHeadDim;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float2 x = make_float2(0.0f, 0.0f);
        if (valid) x = *reinterpret_cast<const float2*>(q_row + ks * 16 + half * 8 + 2 * (lane % 4));
        x.x *= q_scale;
        x.y *= q_scale;
        const __nv_bfloat162 hi = __floats2bfloat162_rn(x.x, x.y);
        const float2 hi_f = __bfloat1622float2(hi);
        q_hi[ks][r + 2 * half] = bits(hi);
        q_lo[ks][r + 2 * half] = bits(__floats2bfloat162_rn(x.x - hi_f.x, x.y - hi_f.y));
      }
    }
  }
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) st.o[n][0] = st.o[n][1] = st.o[n][2] = st.o[n][3] = 0.0f;

  // The key range the warp's rows see, to skip slices none of them sees.
  const int warp_pos_first = first_pos + (row_tile * kRowTile) / group;
  const int warp_pos_last = first_pos + (min(rows, (row_tile + 1) * kRowTile) - 1) / group;
  const int warp_oldest = sliding_window > 0 ? max(0, warp_pos_first - sliding_window + 1) : 0;

  // Stage loads: thread i copies 16 bytes (8 dims) of keys i/8 and i/8 + 32, K and V. Keys
  // past the last position are zero-filled, so a masked key's value is 0 x 0, never garbage.
  // Each call is one cp.async group, empty past the last stage, so groups count uniformly.
  const int32_t* block_table = kv.block_tables + int64_t(tile.seq) * kv.max_pages_per_seq;
  auto issue_stage = [&](int stage, int buffer) {
#pragma unroll
    for (int rep = 0; rep < 2 && stage < n_stages; ++rep) {
      const int key = threadIdx.x / 8 + rep * (kThreads / 8);
      const int chunk = threadIdx.x % 8;
      const int u = key_begin + stage * kStageKeys + key;
      const bool valid = u < key_end;
      int64_t offset = 0;
      if (valid) {
        const int64_t slot = int64_t(block_table[u / kv.page_size]) * kv.page_size + u % kv.page_size;
        offset = (slot * kv_heads + kv_head) * kHeadDim + chunk * 8;
      }
      copy_async16(shared_address(&sh.stage.k[buffer][key][chunk * 8]), kv.k + offset, valid);
      copy_async16(shared_address(&sh.stage.v[buffer][key][chunk * 8]), kv.v + offset, valid);
    }
    copy_async_commit();
  };

  // Stages split, split + splits, ... cycle through the ring; kStages - 1 are in flight.
  for (int i = 0; i < kStages - 1; ++i) issue_stage(split + i * splits, i);
  for (int i = 0, stage = split; stage < n_stages; ++i, stage += splits) {
    copy_async_wait<kStages - 2>();  // this thread's copies of stage i have landed
    __syncthreads();                 // everyone's have; everyone is done with stage i - 1's buffer
    issue_stage(stage + (kStages - 1) * splits, (i + kStages - 1) % kStages);
    if (active) {
      const int buffer = i % kStages;
      const auto* k = sh.stage.k[buffer];
      const auto* v = sh.stage.v[buffer];
      const int keys = kStageKeys / slices;
      const int first = slice * keys;
      const int u_first = key_begin + stage * kStageKeys + first;
      switch (slices) {
        case 1:
          attend_keys<4>(st, q_hi, q_lo, k, v, first, u_first, warp_oldest, warp_pos_last, lane);
          attend_keys<4>(st, q_hi, q_lo, k, v, first + 32, u_first + 32, warp_oldest, warp_pos_last, lane);
          break;
        case 2:
          attend_keys<4>(st, q_hi, q_lo, k, v, first, u_first, warp_oldest, warp_pos_last, lane);
          break;
        case 4:
          attend_keys<2>(st, q_hi, q_lo, k, v, first, u_first, warp_oldest, warp_pos_last, lane);
          break;
        default:
          attend_keys<1>(st, q_hi, q_lo, k, v, first, u_first, warp_oldest, warp_pos_last, lane);
          break;
      }
    }
  }
  copy_async_wait<0>();
  __syncthreads();  // the merge buffers overlay the stages

  // Publish each warp's state, merge the slices of each row (warps of this CTA), then the
  // splits (CTAs of the cluster, through distributed shared memory):
  //   M = max m;  out = Σ 2^(m - M) o / Σ 2^(m - M) l.
  if (active) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 1);
      st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 2);
      const int local = lane / 4 + 8 * r;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        *reinterpret_cast<float2*>(&sh.merge.o[warp][local][n * 8 + 2 * (lane % 4)]) =
            make_float2(st.o[n][2 * r], st.o[n][2 * r + 1]);
      }
      if (lane % 4 == 0) {
        sh.merge.m[warp][local] = st.m[r];
        sh.merge.l[warp][local] = st.l[r];
      }
    }
  }
  __syncthreads();

  __nv_bfloat162* out2 = reinterpret_cast<__nv_bfloat162*>(out);
  auto write_out = [&](int row, float2 o, float sum) {
    const float inv = 1.0f / sum;
    const int64_t out_row = int64_t(tile.first_query + row / group) * heads + kv_head * group + row % group;
    out2[out_row * (kHeadDim / 2) + lane] = __floats2bfloat162_rn(o.x * inv, o.y * inv);
  };
  // Row `row`'s slices sit in warps row_tile, row_tile + row_tiles, ...; only the warp
  // merging the row touches them, so the merged state goes back into slot row_tile.
  for (int row = warp; row < rows; row += kWarps) {
    const int tile_of_row = row / kRowTile;
    const int local = row % kRowTile;
    float m_all = -INFINITY;
    for (int w = tile_of_row; w < row_tiles * slices; w += row_tiles) m_all = fmaxf(m_all, sh.merge.m[w][local]);
    float sum = 0.0f;
    float2 o = make_float2(0.0f, 0.0f);
    for (int w = tile_of_row; w < row_tiles * slices; w += row_tiles) {
      const float weight = exp2f(sh.merge.m[w][local] - m_all);
      const float2 a = *reinterpret_cast<const float2*>(&sh.merge.o[w][local][2 * lane]);
      sum += weight * sh.merge.l[w][local];
      o.x += weight * a.x;
      o.y += weight * a.y;
    }
    if (splits == 1) {
      write_out(row, o, sum);
    } else {
      __syncwarp();  // every lane has read slot tile_of_row before it is overwritten
      *reinterpret_cast<float2*>(&sh.merge.o[tile_of_row][local][2 * lane]) = o;
      if (lane == 0) {
        sh.merge.m[tile_of_row][local] = m_all;
        sh.merge.l[tile_of_row][local] = sum;
      }
    }
  }
  if (splits == 1) return;

  cluster.sync();
  // Rows dealt out over the cluster's warps; the splits' loads are independent, so their
  // remote latencies overlap.
  for (int row = split + splits * warp; row < rows; row += splits * kWarps) {
    const int tile_of_row = row / kRowTile;
    const int local = row % kRowTile;
    float m_split[kMaxSplits];
    float m_all = -INFINITY;
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) {
      m_split[s] = s < splits ? cluster.map_shared_rank(&sh, s)->merge.m[tile_of_row][local] : -INFINITY;
      m_all = fmaxf(m_all, m_split[s]);
    }
    float sum = 0.0f;
    float2 o = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) {
      if (s < splits) {
        const SharedMemory* part = cluster.map_shared_rank(&sh, s);
        const float weight = exp2f(m_split[s] - m_all);
        const float2 a = *reinterpret_cast<const float2*>(&part->merge.o[tile_of_row][local][2 * lane]);
        sum += weight * part->merge.l[tile_of_row][local];
        o.x += weight * a.x;
        o.y += weight * a.y;
      }
    }
    write_out(row, o, sum);
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
  // Above the 48 KB default: an attribute of the function, no stream work (capture-safe).
  OSSRL_CUDA_CHECK(cudaFuncSetAttribute(paged_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(kSharedBytes)));

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
  config.dynamicSmemBytes = kSharedBytes;
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
