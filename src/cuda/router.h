// MoE routing on the GPU: top-k of the router logits, softmax over the chosen k, and the
// grouping of (token, slot) assignments by expert that the expert matmuls walk.
#pragma once

#include <cstdint>

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

}  // namespace ossrl::cuda
