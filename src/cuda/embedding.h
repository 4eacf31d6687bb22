// Token embedding lookup: the first op of the forward pass.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

// hidden [n, hidden_size] fp32 = table[tokens[i]]; table bf16 [vocab, hidden_size].
void embedding_forward(float* hidden, const __nv_bfloat16* table, const int32_t* tokens, int n,
                       int hidden_size, cudaStream_t stream);

}  // namespace ossrl::cuda
