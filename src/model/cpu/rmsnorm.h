// RMSNorm as gpt-oss uses it (no mean subtraction, no bias).
#pragma once

#include <cstdint>

namespace ossrl {

// out [n, dim] = x * rsqrt(mean(x², row) + eps) * weight [dim], in fp32.
// rstd [n] (may be null) receives rsqrt(mean(x²) + eps) per row: the backward pass needs it.
// out may alias x.
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t n,
                     int64_t dim, float eps);

}  // namespace ossrl
