// MoE routing: per-token top-k of the router logits with a softmax over the chosen, and the
// deterministic grouping of (token, slot) assignments by expert.
#include "cuda/router.h"

#include <climits>
#include <cstdint>

#include <cub/block/block_load.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/check.h"

namespace ossrl::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRouterThreads = 128;  // 4 tokens per CTA, one warp each
constexpr int kMaxExpertsPerLane = 8;  // experts <= 256
constexpr int kMaxK = 8;

// A candidate expert: the larger logit wins, the lower index on ties (torch.topk with
// deterministic algorithms, as the CPU reference).
struct Candidate {
  float logit;
  int expert;  // INT_MAX: none
  __device__ bool beats(const Candidate& o) const {
    return expert != INT_MAX && (o.expert == INT_MAX || logit > o.logit || (logit == o.logit && expert < o.expert));
  }
};

// expert_index / expert_weight [n, k]: the k largest of logits [n, experts] + bias [experts],
// descending, and softmax over those k. One warp per token; lane l holds experts l, l + 32, ...
// Each of the k rounds takes the best expert not yet taken by a warp argmax.
__global__ void __launch_bounds__(kRouterThreads)
    router_topk_kernel(int32_t* expert_index, float* expert_weight, const float* logits, const float* bias, int n,
                       int experts, int k) {
  const int lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * (kRouterThreads / 32) + threadIdx.x / 32;
  if (t >= n) return;  // the whole warp leaves together
  float v[kMaxExpertsPerLane];
  unsigned available = 0;  // bit s: expert lane + 32 s exists and is not taken yet
#pragma unroll
  for (int s = 0; s < kMaxExpertsPerLane; ++s) {
    const int e = lane + 32 * s;
    v[s] = e < experts ? logits[t * experts + e] + bias[e] : 0.0f;
    if (e < experts) available |= 1u << s;
  }
  Candidate chosen[kMaxK];
#pragma unroll
  for (int i = 0; i < kMaxK; ++i) {
    if (i >= k) break;
    // Ascending slots, strict comparison: a lane's own ties go to its lower expert.
    Candidate best{0.0f, INT_MAX};
#pragma unroll
    for (int s = 0; s < kMaxExpertsPerLane; ++s) {
      const Candidate c{v[s], lane + 32 * s};
      if ((available >> s & 1) && c.beats(best)) best = c;
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const Candidate other{__shfl_xor_sync(kFullMask, best.logit, offset),
                            __shfl_xor_sync(kFullMask, best.expert, offset)};
      if (other.beats(best)) best = other;
    }
    if (best.expert % 32 == lane) available &= ~(1u << (best.expert / 32));
    chosen[i] = best;
  }
  if (lane != 0) return;
  // Softmax over the chosen, in the CPU's order: the first is the max.
  float weight[kMaxK];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxK; ++i) {
    if (i >= k) break;
    weight[i] = expf(chosen[i].logit - chosen[0].logit);
    sum += weight[i];
  }
#pragma unroll
  for (int i = 0; i < kMaxK; ++i) {
    if (i >= k) break;
    expert_index[t * k + i] = chosen[i].expert;
    expert_weight[t * k + i] = weight[i] / sum;
  }
}

constexpr int kGroupThreads = 1024;
constexpr int kGroupItems = 4;  // consecutive assignments per thread and tile

// One CTA per expert e, each reading all `total` = n*k assignments of expert_index: first the
// count of assignments to lower experts (where e's run starts) and to e, then e's assignments
// compacted in ascending order, tile by tile with a block scan. Needs no scratch memory and no
// atomics, so the result is deterministic and the launch graph-capturable; the reads (n*k ints
// per expert) stay in L2.
__global__ void __launch_bounds__(kGroupThreads)
    moe_group_kernel(int32_t* expert_offsets, int32_t* sorted_assignments, const int32_t* expert_index, int total,
                     int experts) {
  using Reduce = cub::BlockReduce<int2, kGroupThreads>;
  using Scan = cub::BlockScan<int, kGroupThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } storage;
  __shared__ int start_shared;
  const int e = blockIdx.x;

  int2 counts = {0, 0};  // assignments to experts below e, to e
  for (int a = threadIdx.x; a < total; a += kGroupThreads) {
    const int x = expert_index[a];
    counts.x += x < e;
    counts.y += x == e;
  }
  counts = Reduce(storage.reduce).Reduce(counts, [](int2 p, int2 q) { return int2{p.x + q.x, p.y + q.y}; });
  if (threadIdx.x == 0) {
    start_shared = counts.x;
    expert_offsets[e] = counts.x;
    if (e == experts - 1) expert_offsets[experts] = counts.x + counts.y;
  }
  __syncthreads();

  int next = start_shared;  // where e's next assignment goes
  for (int tile = 0; tile < total; tile += kGroupThreads * kGroupItems) {
    int x[kGroupItems];
    cub::LoadDirectBlocked(threadIdx.x, expert_index + tile, x, total - tile, -1);
    int mine = 0;
#pragma unroll
    for (int j = 0; j < kGroupItems; ++j) mine += x[j] == e;
    int before = 0, tile_count = 0;
    Scan(storage.scan).ExclusiveSum(mine, before, tile_count);
    int slot = next + before;
#pragma unroll
    for (int j = 0; j < kGroupItems; ++j) {
      if (x[j] == e) sorted_assignments[slot++] = tile + threadIdx.x * kGroupItems + j;
    }
    next += tile_count;
    __syncthreads();  // the scan storage is reused by the next tile
  }
}

}  // namespace

void router_topk_forward(int32_t* expert_index, float* expert_weight, const float* logits, const float* bias,
                         int n, int experts, int k, cudaStream_t stream) {
  if (n == 0) return;
  constexpr int tokens_per_cta = kRouterThreads / 32;
  router_topk_kernel<<<(n + tokens_per_cta - 1) / tokens_per_cta, kRouterThreads, 0, stream>>>(
      expert_index, expert_weight, logits, bias, n, experts, k);
  OSSRL_CUDA_CHECK_LAUNCH();
}

void moe_group_by_expert(int32_t* expert_offsets, int32_t* sorted_assignments, const int32_t* expert_index,
                         int n, int k, int experts, cudaStream_t stream) {
  moe_group_kernel<<<experts, kGroupThreads, 0, stream>>>(expert_offsets, sorted_assignments, expert_index, n * k,
                                                           experts);
  OSSRL_CUDA_CHECK_LAUNCH();
}

}  // namespace ossrl::cuda
