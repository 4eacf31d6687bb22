// RMSNorm as gpt-oss uses it (no mean subtraction, no bias).
#pragma once

#include <cstdint>

namespace ossrl {

// out [n, dim] = x * rsqrt(mean(x², row) + eps) * weight [dim], in fp32.
// rstd [n] (may be null) receives rsqrt(mean(x²) + eps) per row: the backward pass needs it.
// out may alias x.
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t n,
                     int64_t dim, float eps);

// Backward, given the forward's x and rstd, with xhat = x * rstd:
//   dx [n, dim] += rstd * (g - xhat * mean(g * xhat, row)),  g = dout * weight
//   dweight [dim] += Σ_t dout * xhat                         (dweight may be null)
// dx must not alias dout.
void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x, const float* weight,
                      const float* rstd, int64_t n, int64_t dim);

}  // namespace ossrl
