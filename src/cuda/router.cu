// MoE routing: per-token top-k of the router logits with a softmax over the chosen, the
// deterministic grouping of (token, slot) assignments by expert, and for small steps all of
// it with the norm and router matmul before it in one launch. Every kernel here is a
// programmatic dependent (cuda/launch.cuh) and releases after its wait.
#include "cuda/router.h"

#include <climits>
#include <cstdint>

#include <cooperative_groups.h>
#include <cub/block/block_load.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/check.h"
#include "cuda/launch.cuh"
#include "cuda/rmsnorm_row.cuh"

namespace ossrl::cuda {
namespace {

namespace cg = cooperative_groups;

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

// expert_index / expert_weight [k] of one token: the k largest of logits [experts] + bias
// [experts], descending, and softmax over those k, by one warp; lane l holds experts l, l + 32,
// ... Each of the k rounds takes the best expert not yet taken by a warp argmax. logits and
// bias may be shared memory; index_copy, if not null, gets expert_index too.
__device__ void warp_topk(int32_t* expert_index, float* expert_weight, int32_t* index_copy, const float* logits,
                          const float* bias, int experts, int k) {
  const int lane = threadIdx.x % 32;
  float v[kMaxExpertsPerLane];
  unsigned available = 0;  // bit s: expert lane + 32 s exists and is not taken yet
#pragma unroll
  for (int s = 0; s < kMaxExpertsPerLane; ++s) {
    const int e = lane + 32 * s;
    v[s] = e < experts ? logits[e] + bias[e] : 0.0f;
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
    expert_index[i] = chosen[i].expert;
    if (index_copy != nullptr) index_copy[i] = chosen[i].expert;
    expert_weight[i] = weight[i] / sum;
  }
}

// expert_index / expert_weight [n, k] from logits [n, experts] + bias [experts]: one warp per
// token.
__global__ void __launch_bounds__(kRouterThreads)
    router_topk_kernel(int32_t* expert_index, float* expert_weight, const float* logits, const float* bias, int n,
                       int experts, int k) {
  wait_for_producers();
  release_dependents();
  const int64_t t = int64_t(blockIdx.x) * (kRouterThreads / 32) + threadIdx.x / 32;
  if (t >= n) return;  // the whole warp leaves together
  warp_topk(expert_index + t * k, expert_weight + t * k, nullptr, logits + t * experts, bias, experts, k);
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
  wait_for_producers();
  release_dependents();

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

// The fused routing's work split: one cluster for the whole step, CTA c taking experts
// [4c, 4c + 4) for every token (32 experts: 8 CTAs, the portable cluster size), each thread at
// most kRoutePacks packs of 4 of a row, its 4 router rows held in registers (hidden <= 4096
// with rmsnorm_forward's CTA sizes).
constexpr int kCtaExperts = 4;
constexpr int kRouteCtas = kMoeRouteMaxExperts / kCtaExperts;
constexpr int kRoutePacks = 4;

// expert_offsets [experts + 1] and sorted_assignments [n*k] from expert_index [n, k] (shared
// memory) for n <= 64, by one CTA: a token picks an expert at most once, so an assignment's
// rank among its expert's is the number of earlier tokens that picked the expert, a popcount
// of the expert's 64-bit token mask.
template <int kThreads>
__device__ void group_small_step(int32_t* expert_offsets, int32_t* sorted_assignments, const int32_t* expert_index,
                                 int n, int k, int experts) {
  constexpr int kMaxExperts = 32 * kMaxExpertsPerLane;
  constexpr int kItems = kMaxExperts / kThreads;  // experts per thread in the scan, blocked
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned long long tokens_of[kMaxExperts];  // bit t: token t picked the expert
  __shared__ int group_start[kMaxExperts];
  for (int e = threadIdx.x; e < experts; e += kThreads) tokens_of[e] = 0;
  __syncthreads();
  const int total = n * k;
  for (int a = threadIdx.x; a < total; a += kThreads) atomicOr(&tokens_of[expert_index[a]], 1ull << (a / k));
  __syncthreads();
  int start[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int e = threadIdx.x * kItems + j;
    start[j] = e < experts ? __popcll(tokens_of[e]) : 0;
  }
  Scan(scan_storage).ExclusiveSum(start, start);
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int e = threadIdx.x * kItems + j;
    if (e < experts) group_start[e] = expert_offsets[e] = start[j];
  }
  if (threadIdx.x == 0) expert_offsets[experts] = total;
  __syncthreads();
  for (int a = threadIdx.x; a < total; a += kThreads) {
    const int e = expert_index[a];
    const unsigned long long earlier_tokens = (1ull << (a / k)) - 1;
    sorted_assignments[group_start[e] + __popcll(tokens_of[e] & earlier_tokens)] = a;
  }
}

// moe_route_fused's kernel: one cluster, grid = cluster = (ceil(experts / 4)), kThreads = the
// CTA rmsnorm_forward gives a row, so each CTA norms the rows exactly as rmsnorm_forward does.
// A CTA first loads its router rows into registers and CTA 0 reads the bias, which overlaps the
// norms' round trips. Each thread's dot products are summed over the warp by shuffles and over
// the warps in a fixed order, and the logits land in CTA 0's shared memory, where, after the
// cluster barrier, warp t takes token t's top-k and the CTA groups the assignments: no global
// atomics, no fences.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    moe_route_fused_kernel(__nv_bfloat16* normed, float* logits, int32_t* expert_index, float* expert_weight,
                           int32_t* expert_offsets, int32_t* sorted_assignments, const float* x,
                           const float* norm_weight, const __nv_bfloat16* router_weight, const float* router_bias,
                           int n, int hidden, int experts, int k, float eps) {
  using Row = RmsnormRow<kThreads, 4>;
  using Bf16x4 = Pack<__nv_bfloat16, 4>;
  constexpr int kWarps = kThreads / 32;
  constexpr int kMaxExperts = kCtaExperts * kRouteCtas;
  __shared__ typename Row::Storage norm_storage;
  __shared__ float partial[kWarps][kMoeRouteMaxTokens][kCtaExperts];
  __shared__ float cluster_logits[kMoeRouteMaxTokens * kMaxExperts];  // CTA 0's: [n, experts]
  __shared__ float bias[kMaxExperts];
  __shared__ int32_t chosen[kMoeRouteMaxTokens * kMaxK];
  const cg::cluster_group cluster = cg::this_cluster();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int rank = int(cluster.block_rank()), ctas = int(cluster.num_blocks());
  const int e0 = rank * kCtaExperts, cta_experts = min(kCtaExperts, experts - e0);
  const int packs = hidden / 4;

  Bf16x4 w[kCtaExperts][kRoutePacks];
#pragma unroll
  for (int e = 0; e < kCtaExperts; ++e) {
    const auto* row = reinterpret_cast<const Bf16x4*>(router_weight + int64_t(e0 + e) * hidden);
#pragma unroll
    for (int j = 0; j < kRoutePacks; ++j) {
      const int p = threadIdx.x + j * kThreads;
      w[e][j] = e < cta_experts && p < packs ? row[p] : Bf16x4{};
    }
  }
  if (rank == 0) {
    for (int e = threadIdx.x; e < experts; e += kThreads) bias[e] = router_bias[e];
  }
  wait_for_producers();
  release_dependents();

  // Every CTA takes every row's norm itself (n <= 4 block reductions, the rows read at once by
  // all CTAs) rather than wait for another's; CTA t % ctas writes row t to `normed`.
  float rstd[kMoeRouteMaxTokens];
#pragma unroll
  for (int t = 0; t < kMoeRouteMaxTokens; ++t) {
    if (t >= n) break;
    const float* xr = x + int64_t(t) * hidden;
    rstd[t] = Row::rstd(xr, hidden, eps, norm_storage);
    if (t % ctas == rank) {
      auto* out = reinterpret_cast<Bf16x4*>(normed + int64_t(t) * hidden);
      for (int p = threadIdx.x; p < packs; p += kThreads) out[p] = Row::scale(xr, norm_weight, p, rstd[t]);
    }
    __syncthreads();  // norm_storage is reused by the next row
  }
  // All tokens' dot products at once (independent sums, so their shuffles overlap).
  float acc[kMoeRouteMaxTokens][kCtaExperts] = {};
#pragma unroll
  for (int t = 0; t < kMoeRouteMaxTokens; ++t) {
    if (t >= n) break;
    const float* xr = x + int64_t(t) * hidden;
#pragma unroll
    for (int j = 0; j < kRoutePacks; ++j) {
      const int p = threadIdx.x + j * kThreads;
      if (p >= packs) break;
      const Bf16x4 y = Row::scale(xr, norm_weight, p, rstd[t]);
#pragma unroll
      for (int e = 0; e < kCtaExperts; ++e) {
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[t][e] += __bfloat162float(y.v[c]) * __bfloat162float(w[e][j].v[c]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kMoeRouteMaxTokens; ++t) {
    if (t >= n) break;
#pragma unroll
    for (int e = 0; e < kCtaExperts; ++e) {
      float v = acc[t][e];
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
      if (lane == 0) partial[warp][t][e] = v;
    }
  }
  __syncthreads();
  float* leader_logits = cluster.map_shared_rank(cluster_logits, 0);
  if (int(threadIdx.x) < n * cta_experts) {
    const int t = threadIdx.x / cta_experts, e = threadIdx.x % cta_experts;
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < kWarps; ++r) sum += partial[r][t][e];
    logits[int64_t(t) * experts + e0 + e] = sum;
    leader_logits[t * experts + e0 + e] = sum;
  }
  cluster.sync();  // every CTA's logits are in CTA 0's shared memory
  if (rank != 0) return;
  for (int t = warp; t < n; t += kWarps) {
    warp_topk(expert_index + t * k, expert_weight + t * k, chosen + t * k, cluster_logits + t * experts, bias,
              experts, k);
  }
  __syncthreads();
  group_small_step<kThreads>(expert_offsets, sorted_assignments, chosen, n, k, experts);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

void router_topk_forward(int32_t* expert_index, float* expert_weight, const float* logits, const float* bias,
                         int n, int experts, int k, cudaStream_t stream) {
  if (n == 0) return;
  constexpr int tokens_per_cta = kRouterThreads / 32;
  const LaunchShape shape{.grid = dim3((n + tokens_per_cta - 1) / tokens_per_cta), .block = kRouterThreads};
  launch_kernel(router_topk_kernel, shape, stream, expert_index, expert_weight, logits, bias, n, experts, k);
}

void moe_group_by_expert(int32_t* expert_offsets, int32_t* sorted_assignments, const int32_t* expert_index,
                         int n, int k, int experts, cudaStream_t stream) {
  const LaunchShape shape{.grid = dim3(experts), .block = kGroupThreads};
  launch_kernel(moe_group_kernel, shape, stream, expert_offsets, sorted_assignments, expert_index, n * k, experts);
}

bool moe_route_fusable(int n, int hidden, int experts, int k) {
  if (n < 1 || n > kMoeRouteMaxTokens || k < 1 || k > kMaxK || experts < k || experts > kCtaExperts * kRouteCtas ||
      hidden < 4 || hidden % 4 != 0) {
    return false;
  }
  const int packs = hidden / 4;
  const int threads = rmsnorm_threads(packs);
  return (packs + threads - 1) / threads <= kRoutePacks;
}

void moe_route_fused(__nv_bfloat16* normed, float* logits, int32_t* expert_index, float* expert_weight,
                     int32_t* expert_offsets, int32_t* sorted_assignments, const float* x, const float* norm_weight,
                     const __nv_bfloat16* router_weight, const float* router_bias, int n, int hidden, int experts,
                     int k, float eps, cudaStream_t stream) {
  // Outside these the result would differ from rmsnorm_forward's (another access width) or not
  // fit the kernel's registers and masks.
  if (!moe_route_fusable(n, hidden, experts, k) || !aligned(x, 16) || !aligned(norm_weight, 16) ||
      !aligned(router_weight, 8) || !aligned(normed, 8)) {
    fail_cuda(cudaErrorInvalidValue, "moe_route_fused outside moe_route_fusable or misaligned", __FILE__, __LINE__);
  }
  const unsigned ctas = unsigned((experts + kCtaExperts - 1) / kCtaExperts);
  with_rmsnorm_threads(hidden / 4, [&]<int kThreads>() {
    launch_kernel(moe_route_fused_kernel<kThreads>, {.grid = dim3(ctas), .block = kThreads, .cluster = dim3(ctas, 1, 1)},
                  stream, normed, logits, expert_index, expert_weight, expert_offsets, sorted_assignments, x,
                  norm_weight, router_weight, router_bias, n, hidden, experts, k, eps);
  });
}

}  // namespace ossrl::cuda
