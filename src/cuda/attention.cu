// Paged causal GQA attention with sinks and sliding windows (cuda/attention.h), on tensor cores.
//
// One cluster of CTAs per (query tile, kv heads). A kv head's rows are the tile's queries x
// the query heads of its group (up to 16 x 8 = 128), so each K/V row read from the cache
// serves all of them. Keys stream through shared memory 128 rows at a time (cp.async, a ring
// of 3 stages); a warp owns one 16-row tile of one kv head and a slice of that head's keys in
// each stage, computes S = Q K^T and O += P V with bf16 mma.sync (fp32 accumulation) and keeps
// an online softmax per row. q arrives in fp32 and is split into bf16 hi + lo halves (two
// mmas), so the scores carry ~16 mantissa bits, not bf16's 8; P is rounded to bf16 like flash
// attention's.
//
// A prefill tile's 8 row tiles of one kv head fill the CTA's 8 warps. A decode tile has 8 rows
// a kv head, a single row tile: when the caller says every tile is that small, a CTA takes up to
// 8 kv heads of its sequence, a warp each, and a stage holds 16 positions x 8 heads. Its copies
// are then whole 1 KB cache rows, and a batch of 256 sequences is one wave of 256 CTAs, each
// streaming 8x the K/V of a CTA of one kv head (whose own set-up, first latency and merge cost
// as much as its 32 KB of a 128-key window); smaller batches take fewer heads a CTA.
//
// Warps that share a row tile, the CTAs of a cluster (keys dealt out when the grid alone would
// leave SMs idle: flash-decoding) each hold a partial softmax state; they are merged through
// (distributed) shared memory at the end, so nothing beyond the arguments is allocated and the
// launch is graph capturable.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention.h"
#include "cuda/check.h"
#include "cuda/launch.cuh"
#include "cuda/mma.cuh"

namespace ossrl::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kHeadDim = 64;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowTile = 16;  // rows per warp: the mma's m
constexpr int kMaxGroup = kWarps * kRowTile / kAttentionTileQueries;  // query heads per kv head
// K (and V) rows a stage holds: 128 positions of one kv head, or 128 / n positions of n; a
// decode warp's share of a stage is then 16 keys (one whole P V k-step) whatever n is.
constexpr int kStageRows = 128;
// Stages in the ring: 2 (64 KB) load while one is used. 108 KB still fits the two CTAs an SM
// that the registers allow.
constexpr int kStages = 3;
// 16-byte copies of K (and as many of V) a thread issues for a stage.
constexpr int kStageCopies = kStageRows * (kHeadDim / 8) / kThreads;
// K/V rows in shared memory padded to 144 bytes: the 8 rows an ldmatrix phase reads fall on
// distinct banks.
constexpr int kRowPad = kHeadDim + 8;
constexpr int kMergePad = kHeadDim + 8;
constexpr int kMaxSplits = 8;  // portable cluster size
constexpr float kLog2e = 1.4426950408889634f;

struct StageBuffers {
  uint16_t k[kStages][kStageRows][kRowPad];  // bf16 bits
  uint16_t v[kStages][kStageRows][kRowPad];
};
// After the key loop: each warp's partial state for its 16 rows; after the merge of the
// slices, task t's merged state sits in slot t.
struct MergeBuffers {
  float o[kWarps][kRowTile][kMergePad];  // unnormalised output
  float m[kWarps][kRowTile];             // running max, log2 units
  float l[kWarps][kRowTile];             // sum of exp2(s - m), sink included once
};
union __align__(16) SharedMemory {
  StageBuffers stage;
  MergeBuffers merge;
};
constexpr size_t kSharedBytes = sizeof(SharedMemory);  // 108 KB: dynamic shared memory


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

// The key positions a warp's rows see: some row sees each of [oldest, newest], every row
// each of [all_from, all_to] (empty when the rows' ranges do not overlap).
struct KeyRange {
  int oldest, newest;
  int all_from, all_to;
};

// Scores, softmax update and P V for kTiles * 8 keys of a stage (kTiles even: whole P V
// k-steps), starting at stage row `first` (position u_first), against the warp's 16 rows.
// Slices no row sees are skipped, and the mask is applied only to slices some row does not
// see whole (warp-uniform branches).
template <int kTiles>
__device__ void attend_keys(RowState& st, const uint32_t (&q_hi)[4][4], const uint32_t (&q_lo)[4][4],
                            const uint16_t (*k)[kRowPad], const uint16_t (*v)[kRowPad], int first, int u_first,
                            const KeyRange& seen, int lane) {
  static_assert(kTiles % 2 == 0);
  const int u_last = u_first + kTiles * 8 - 1;
  if (u_first > seen.newest || u_last < seen.oldest) return;
  // S = Q K^T: ldmatrix of K rows (keys) gives the col-major B fragment directly.
  float s[kTiles][4];
  qk_scores_split(s, q_hi, q_lo, [&](int r) { return &k[first + r][0]; }, lane);

  // Causality and the window (a padding row sees nothing; where no mask is applied its scores
  // are q = 0's, finite, and its state is never written), then the online softmax per row.
  if (u_first < seen.all_from || u_last > seen.all_to) {
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int u = u_first + j * 8 + 2 * (lane % 4) + (e & 1);
        const int r = e / 2;
        if (u < st.oldest[r] || u > st.pos[r]) s[j][e] = -INFINITY;
      }
    }
  }
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
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
  // fragment.
#pragma unroll
  for (int ks = 0; ks < kTiles / 2; ++ks) {
    const uint32_t a[4] = {p[2 * ks][0], p[2 * ks][1], p[2 * ks + 1][0], p[2 * ks + 1][1]};
    const int key0 = first + ks * 16;
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; n += 2) {
      uint32_t b[4];
      load_matrix_x4_trans(b, shared_address(&v[key0 + ((lane / 8) % 2) * 8 + lane % 8][(n + lane / 16) * 8]));
      mma_bf16(st.o[n], a, b[0], b[1]);
      mma_bf16(st.o[n + 1], a, b[2], b[3]);
    }
  }
}

__device__ __forceinline__ int floor_pow2(int x) { return 1 << (31 - __clz(x)); }

// Grid (n_tiles, ceil(kv_heads / heads_per_cta), splits), cluster (1, 1, splits), kThreads
// threads. out [n_queries, heads, 64] bf16; q [n_queries, heads, 64] fp32; sinks [heads] fp32;
// kv.k / kv.v [slots, kv_heads, 64] bf16. A CTA takes its kv heads in passes of as many as
// its warps hold row tiles for (a decode tile's 8 rows a head: all 8 at once). In a pass of
// `pass_heads` heads, kv head pass_head + j's rows are row r = query r / group of the tile x
// query head (pass_head + j) * group + r % group, in row tiles of 16; a task is one row tile of
// one head, and warp w takes task w % tasks and key slice w / tasks of each stage (8 warps =
// tasks x slices, slices a power of two). A programmatic dependent (cuda/launch.cuh): before
// its wait it reads only the tile, query positions, block tables and sinks; released after its
// wait.
__global__ void __launch_bounds__(kThreads, 2)
    paged_attention_kernel(__nv_bfloat16* __restrict__ out, const float* __restrict__ q, PagedKv kv,
                           const float* __restrict__ sinks, const int32_t* __restrict__ query_pos,
                           const QueryTile* __restrict__ tiles, int heads, int kv_heads, int sliding_window,
                           int heads_per_cta) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  SharedMemory& sh = *reinterpret_cast<SharedMemory*>(shared_bytes);
  const QueryTile tile = tiles[blockIdx.x];
  if (tile.count <= 0) {
    // A padding tile: the whole cluster (same blockIdx.x) leaves before any cluster barrier,
    // after the wait every CTA owes the launch.
    wait_for_producers();
    release_dependents();
    return;
  }
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = int(cluster.num_blocks());
  const int split = int(cluster.block_rank());
  const int group = heads / kv_heads;
  const int head_rows = tile.count * group;  // rows of one kv head
  const int row_tiles = (head_rows + kRowTile - 1) / kRowTile;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  const int first_pos = query_pos[tile.first_query];
  const int key_begin = sliding_window > 0 ? max(0, first_pos - sliding_window + 1) : 0;
  const int key_end = first_pos + tile.count;  // one past the last query's position
  const int32_t* block_table = kv.block_tables + int64_t(tile.seq) * kv.max_pages_per_seq;
  const int head_end = min(kv_heads, int(blockIdx.y + 1) * heads_per_cta);
  const float q_scale = kLog2e / sqrtf(float(kHeadDim));

  for (int pass_head = blockIdx.y * heads_per_cta, pass_heads; pass_head < head_end; pass_head += pass_heads) {
    pass_heads = min(floor_pow2(kWarps / row_tiles), floor_pow2(head_end - pass_head));
    const int tasks = pass_heads * row_tiles;
    const int slices = floor_pow2(kWarps / tasks);
    const bool active = warp < tasks * slices;
    const int task = warp % tasks;
    const int slice = warp / tasks;
    const int kv_head = pass_head + task / row_tiles;
    const int row_tile = task % row_tiles;
    // A stage holds kStageRows K (and V) rows: stage_keys positions x the pass's heads.
    const int stage_keys = kStageRows / pass_heads;
    const int n_stages = (key_end - key_begin + stage_keys - 1) / stage_keys;

    // Stage loads: thread i copies 16 bytes (8 dims) of rows i/8 + 32 j (j < 4), K and V. Row
    // c is position c / pass_heads of the stage, kv head c % pass_heads: the heads of a
    // position are adjacent in the cache, so a pass of 8 heads reads whole 1 KB cache rows. In
    // shared memory the rows go head-major (head j's keys at rows j * stage_keys + ...), so a
    // task's keys are consecutive. Positions past the last are zero-filled, so a masked key's
    // value is 0 x 0, never garbage; their copies name the last position's row (read anyway),
    // not one address that every CTA's would share. lookup finds a stage's cache slots (for a
    // position past the last: -1 - the last one's slot). Each issue is one cp.async group,
    // empty past the last stage (no copies: the ring's last stages would otherwise zero-fill
    // whole stages), so groups count uniformly.
    const int head_shift = 31 - __clz(pass_heads);
    auto lookup = [&](int stage, int (&slot)[kStageCopies]) {
#pragma unroll
      for (int rep = 0; rep < kStageCopies; ++rep) {
        const int u = key_begin + stage * stage_keys + ((threadIdx.x / 8 + rep * (kThreads / 8)) >> head_shift);
        const int at = min(u, key_end - 1);
        const int at_slot = block_table[at / kv.page_size] * kv.page_size + at % kv.page_size;
        slot[rep] = u < key_end ? at_slot : -1 - at_slot;
      }
    };
    auto issue = [&](int stage, int buffer, const int (&slot)[kStageCopies]) {
#pragma unroll
      for (int rep = 0; rep < kStageCopies && stage < n_stages; ++rep) {
        const int c = threadIdx.x / 8 + rep * (kThreads / 8);
        const int head = c & (pass_heads - 1);
        const int row = head * stage_keys + (c >> head_shift);
        const int chunk = threadIdx.x % 8;
        const bool valid = slot[rep] >= 0;
        const int64_t at_slot = valid ? slot[rep] : -1 - slot[rep];
        const int64_t offset = (at_slot * kv_heads + pass_head + head) * kHeadDim + chunk * 8;
        copy_async16(shared_address(&sh.stage.k[buffer][row][chunk * 8]), kv.k + offset, valid);
        copy_async16(shared_address(&sh.stage.v[buffer][row][chunk * 8]), kv.v + offset, valid);
      }
      copy_async_commit();
    };

    // Stages split, split + splits, ... cycle through the ring; kStages - 1 are in flight.
    // The first ones' slots come before the wait (block tables are step inputs), their copies
    // after it (the cache rows of this step's tokens were just written).
    int first_slots[kStages - 1][kStageCopies];
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) lookup(split + i * splits, first_slots[i]);
    wait_for_producers();
    release_dependents();
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) issue(split + i * splits, i, first_slots[i]);

    // Row `row` of kv head `head`: its row of q and of out, both seen as [n_queries * heads, 64].
    auto q_row_of = [&](int row, int head) {
      return int64_t(tile.first_query + row / group) * heads + head * group + row % group;
    };

    // This thread's two rows: position, window, sink, and q split into bf16 hi + lo A
    // fragments, pre-scaled by log2(e)/sqrt(64) so the scores come out in log2 units.
    RowState st;
    uint32_t q_hi[4][4], q_lo[4][4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_tile * kRowTile + lane / 4 + 8 * r;
      const bool valid = active && row < head_rows;
      const int pos = first_pos + row / group;
      st.pos[r] = valid ? pos : -1;
      st.oldest[r] = sliding_window > 0 ? max(0, pos - sliding_window + 1) : 0;
      st.m[r] = valid ? sinks[kv_head * group + row % group] * kLog2e : 0.0f;
      // The sink's exp2(sink - m) = 1, counted once: by one lane of the quad, slice 0, split 0.
      st.l[r] = valid && lane % 4 == 0 && slice == 0 && split == 0 ? 1.0f : 0.0f;
      const float* q_row = q + q_row_of(row, kv_head) * kHeadDim;
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

    // The keys the warp's rows see, from its first and last row's.
    KeyRange seen;
    seen.all_to = first_pos + (row_tile * kRowTile) / group;
    seen.newest = first_pos + (min(head_rows, (row_tile + 1) * kRowTile) - 1) / group;
    seen.oldest = sliding_window > 0 ? max(0, seen.all_to - sliding_window + 1) : 0;
    seen.all_from = sliding_window > 0 ? max(0, seen.newest - sliding_window + 1) : 0;

    const int keys = stage_keys / slices;  // 16, 32, 64 or 128 a warp
    const int first = (task / row_tiles) * stage_keys + slice * keys;
    for (int i = 0, stage = split; stage < n_stages; ++i, stage += splits) {
      copy_async_wait<kStages - 2>();  // this thread's copies of stage i have landed
      __syncthreads();                 // everyone's have; everyone is done with stage i - 1's buffer
      int slots[kStageCopies];
      lookup(stage + (kStages - 1) * splits, slots);
      issue(stage + (kStages - 1) * splits, (i + kStages - 1) % kStages, slots);
      if (active) {
        const int buffer = i % kStages;
        const auto* k = sh.stage.k[buffer];
        const auto* v = sh.stage.v[buffer];
        const int u_first = key_begin + stage * stage_keys + slice * keys;
        if (keys == 16) {
          attend_keys<2>(st, q_hi, q_lo, k, v, first, u_first, seen, lane);
        } else {
          for (int key = 0; key < keys; key += 32) {
            attend_keys<4>(st, q_hi, q_lo, k, v, first + key, u_first + key, seen, lane);
          }
        }
      }
    }
    copy_async_wait<0>();
    __syncthreads();  // every warp is done with the stages, which the merge buffers overlay

    // Publish each warp's state, merge the slices of each task's rows (warps of this CTA), then
    // the splits (CTAs of the cluster, through distributed shared memory):
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

    // Slot s is row s % 16 of task s / 16: row (s / 16 % row_tiles) * 16 + s % 16 of kv head
    // pass_head + s / 16 / row_tiles; -1 for a padding row.
    auto head_row = [&](int s) {
      const int row = ((s / kRowTile) % row_tiles) * kRowTile + s % kRowTile;
      return row < head_rows ? row : -1;
    };
    __nv_bfloat162* out2 = reinterpret_cast<__nv_bfloat162*>(out);
    auto write_out = [&](int s, int row, float2 o, float sum) {
      const float inv = 1.0f / sum;
      out2[q_row_of(row, pass_head + s / kRowTile / row_tiles) * (kHeadDim / 2) + lane] =
          __floats2bfloat162_rn(o.x * inv, o.y * inv);
    };
    // A task's slices sit in warps task, task + tasks, ...; only the warp merging a row touches
    // them, so the merged state goes back into slot task.
    for (int s = warp; s < tasks * kRowTile; s += kWarps) {
      const int row = head_row(s);
      if (row < 0) continue;
      const int task_of_row = s / kRowTile;
      const int local = s % kRowTile;
      float m_all = -INFINITY;
      for (int w = task_of_row; w < tasks * slices; w += tasks) m_all = fmaxf(m_all, sh.merge.m[w][local]);
      float sum = 0.0f;
      float2 o = make_float2(0.0f, 0.0f);
      for (int w = task_of_row; w < tasks * slices; w += tasks) {
        const float weight = exp2f(sh.merge.m[w][local] - m_all);
        const float2 a = *reinterpret_cast<const float2*>(&sh.merge.o[w][local][2 * lane]);
        sum += weight * sh.merge.l[w][local];
        o.x += weight * a.x;
        o.y += weight * a.y;
      }
      if (splits == 1) {
        write_out(s, row, o, sum);
      } else {
        __syncwarp();  // every lane has read slot task_of_row before it is overwritten
        *reinterpret_cast<float2*>(&sh.merge.o[task_of_row][local][2 * lane]) = o;
        if (lane == 0) {
          sh.merge.m[task_of_row][local] = m_all;
          sh.merge.l[task_of_row][local] = sum;
        }
      }
    }
    if (splits == 1) {
      __syncthreads();  // the next pass's stages overlay the merge buffers
      continue;
    }

    cluster.sync();
    // Slots dealt out over the cluster's warps; the splits' loads are independent, so their
    // remote latencies overlap.
    for (int s = split + splits * warp; s < tasks * kRowTile; s += splits * kWarps) {
      const int row = head_row(s);
      if (row < 0) continue;
      const int task_of_row = s / kRowTile;
      const int local = s % kRowTile;
      float m_split[kMaxSplits];
      float m_all = -INFINITY;
#pragma unroll
      for (int r = 0; r < kMaxSplits; ++r) {
        m_split[r] = r < splits ? cluster.map_shared_rank(&sh, r)->merge.m[task_of_row][local] : -INFINITY;
        m_all = fmaxf(m_all, m_split[r]);
      }
      float sum = 0.0f;
      float2 o = make_float2(0.0f, 0.0f);
#pragma unroll
      for (int r = 0; r < kMaxSplits; ++r) {
        if (r < splits) {
          const SharedMemory* part = cluster.map_shared_rank(&sh, r);
          const float weight = exp2f(m_split[r] - m_all);
          const float2 a = *reinterpret_cast<const float2*>(&part->merge.o[task_of_row][local][2 * lane]);
          sum += weight * part->merge.l[task_of_row][local];
          o.x += weight * a.x;
          o.y += weight * a.y;
        }
      }
      write_out(s, row, o, sum);
    }
    cluster.sync();  // no CTA reuses or leaves its shared memory while another still reads it
  }
}

}  // namespace

void paged_attention_forward(__nv_bfloat16* out, const float* q, const PagedKv& kv, const float* sinks,
                             const int32_t* query_pos, const QueryTile* tiles, int n_tiles, int heads,
                             int kv_heads, int head_dim, int sliding_window, cudaStream_t stream,
                             int max_tile_queries) {
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
  if (max_tile_queries < 1 || max_tile_queries > kAttentionTileQueries) {
    fail_cuda(cudaErrorInvalidValue, "paged_attention_forward: max_tile_queries must be in [1, 16]", __FILE__,
              __LINE__);
  }
  if (n_tiles == 0) return;
  // Above the 48 KB default: an attribute of the function, no stream work (capture-safe).
  OSSRL_CUDA_CHECK(cudaFuncSetAttribute(paged_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(kSharedBytes)));
  // Attribute queries are no stream work either.
  int device = 0, sms = 0;
  OSSRL_CUDA_CHECK(cudaGetDevice(&device));
  OSSRL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));

  // Kv heads a CTA takes: as many as its warps hold the row tiles of (a decode tile has one row
  // tile a kv head: 8, whose rows are whole cache rows), while the CTAs still number 1.5 an SM.
  // A CTA streams K/V at a rate capped by what it keeps in flight, so a decode step needs most
  // of the two CTAs an SM resident, and CTAs of fewer kv heads do that better than clusters of
  // key splits (on an H100, 64 clusters of 4 CTAs of 8 heads took 1.7x as long as 256 CTAs of
  // 8 heads streaming as many bytes each).
  // A step of few sequences keeps a CTA per kv head and splits its keys.
  const int max_row_tiles = (max_tile_queries * (heads / kv_heads) + kRowTile - 1) / kRowTile;
  int heads_per_cta = kWarps / max_row_tiles;  // a power of two, max_row_tiles being at most 8
  auto ctas_of = [&](int per_cta) { return int64_t(n_tiles) * ((kv_heads + per_cta - 1) / per_cta); };
  while (heads_per_cta > 1 && 2 * ctas_of(heads_per_cta) < 3 * int64_t(sms)) heads_per_cta /= 2;

  // Split the keys over a cluster only while the CTAs alone leave SMs idle: two CTAs are
  // resident per SM.
  const int64_t resident = 2 * int64_t(sms);
  const int64_t ctas = ctas_of(heads_per_cta);
  int splits = 1;
  while (splits < kMaxSplits && ctas * splits * 2 <= resident) splits *= 2;

  const LaunchShape shape{
      .grid = dim3(unsigned(n_tiles), unsigned((kv_heads + heads_per_cta - 1) / heads_per_cta), unsigned(splits)),
      .block = dim3(kThreads),
      .shared_bytes = kSharedBytes,
      .cluster = dim3(1, 1, unsigned(splits))};
  launch_kernel(paged_attention_kernel, shape, stream, out, q, kv, sinks, query_pos, tiles, heads, kv_heads,
                sliding_window, heads_per_cta);
}

}  // namespace ossrl::cuda
