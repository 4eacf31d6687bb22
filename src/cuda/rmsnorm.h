// RMSNorm from the fp32 residual stream to the bf16 input of the next matmul.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

// out [n, hidden] bf16: row i = x[r] * rsqrt(mean(x[r]^2) + eps) * weight, in fp32 as
// transformers computes it, with r = rows[i] (rows may be null: r = i). x [*, hidden] fp32,
// weight [hidden] fp32. `rows` lets the final norm run on each sequence's last token only.
void rmsnorm_forward(__nv_bfloat16* out, const float* x, const float* weight, const int32_t* rows, int n,
                     int hidden, float eps, cudaStream_t stream);

// Backward of rmsnorm_forward (rows null) for training: with r = rsqrt(mean(x²) + eps),
//   dx [n, hidden] fp32 += r · (w ⊙ dy - x · r² · mean(x ⊙ w ⊙ dy))
// given dy [n, hidden] fp32 = dL/d(out) and the forward's x and weight (the bf16 rounding of
// out is taken as the identity, as autograd does). dx may alias nothing else.
void rmsnorm_backward(float* dx, const float* dy, const float* x, const float* weight, int n, int hidden, float eps,
                      cudaStream_t stream);

}  // namespace ossrl::cuda
