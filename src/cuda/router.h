// MoE routing on the GPU: top-k of the router logits, softmax over the chosen k, and the
// grouping of (token, slot) assignments by expert that the expert matmuls walk.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

// logits [n, experts] fp32, the router matmul's output without its bias. Per token: the k
// largest of logits + bias (ties: lowest expert index first, as the CPU reference) give
// expert_index [n, k] int32 in descending order and expert_weight [n, k] fp32 = softmax over
// those k only. k <= 8, experts <= 256.
void router_topk_forward(int32_t* expert_index, float* expert_weight, const float* logits, const float* bias,
                         int n, int experts, int k, cudaStream_t stream);

// Groups the n*k assignments a = t*k + s by expert, ascending a within an expert (so the
// result is deterministic): expert_offsets [experts + 1] (offsets[0] = 0, offsets[experts] =
// n*k) and sorted_assignments [n*k], expert e's assignments at [offsets[e], offsets[e+1]).
void moe_group_by_expert(int32_t* expert_offsets, int32_t* sorted_assignments, const int32_t* expert_index,
                         int n, int k, int experts, cudaStream_t stream);

// The most tokens (and experts) moe_route_fused takes: one cluster of CTAs does the whole step,
// each CTA 4 experts for every token, which pays where the work is tiny. On an H100 (graph
// replays, hidden 2880, 32 experts) it took 9.1 / 10.0 / 11.6 µs at 1 / 2 / 4 tokens against
// 12.1-12.2 µs for the four launches, and 15.1 against 12.3 at 8 tokens; with 128 experts (a
// cluster of 8 CTAs taking 16 each) it lost at every size (15.3 against 12.9 at 1 token).
inline constexpr int kMoeRouteMaxTokens = 4;
inline constexpr int kMoeRouteMaxExperts = 32;

// Whether moe_route_fused handles a step of n tokens: 1 <= n <= kMoeRouteMaxTokens, experts
// <= kMoeRouteMaxExperts, k <= 8, hidden % 4 == 0 and hidden <= 4096 (a row's share per thread
// is held in registers).
bool moe_route_fusable(int n, int hidden, int experts, int k);

// Small steps' MoE routing in one launch, the same results as the sequence
//   rmsnorm_forward(normed, x, norm_weight) ; linear_forward(logits, normed, router_weight) ;
//   router_topk_forward(expert_index, expert_weight, logits, router_bias) ;
//   moe_group_by_expert(expert_offsets, sorted_assignments, expert_index)
// whose four launches (latency and near-empty grids) cost more than their work at small
// decode batches: normed [n, hidden] bf16 bit for bit, logits [n, experts] fp32 up to summation
// order (bf16 products, fp32 sums), and from those the same expert_index, expert_weight,
// expert_offsets and sorted_assignments. x [n, hidden] fp32 (the residual rows), norm_weight
// [hidden] fp32, router_weight [experts, hidden] bf16, router_bias [experts] fp32; x and
// norm_weight 16-byte aligned, router_weight and normed 8-byte aligned. Requires
// moe_route_fusable(n, hidden, experts, k).
void moe_route_fused(__nv_bfloat16* normed, float* logits, int32_t* expert_index, float* expert_weight,
                     int32_t* expert_offsets, int32_t* sorted_assignments, const float* x, const float* norm_weight,
                     const __nv_bfloat16* router_weight, const float* router_bias, int n, int hidden, int experts,
                     int k, float eps, cudaStream_t stream);

}  // namespace ossrl::cuda
