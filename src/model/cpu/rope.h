// Rotary position embedding, half-split layout: within each head, element j pairs with
// element j + head_dim/2 (not interleaved pairs).
#pragma once

#include <cstdint>

#include "model/rope.h"

namespace ossrl {

// cos, sin [head_dim/2] for one position: cos(p * inv_freq[j]) * attention_scaling (and sin).
void rope_cos_sin(float* cos, float* sin, int64_t position, const RopeFrequencies& freqs);

// In place on x [n, heads, head_dim], token t at position first_position + t:
//   [x1, x2] -> [x1*cos - x2*sin, x2*cos + x1*sin], x1 = x[:d/2], x2 = x[d/2:].
// The same rotation serves q and k.
void rope_forward(float* x, int64_t n, int heads, int head_dim, int64_t first_position,
                  const RopeFrequencies& freqs);

// Backward, in place on the gradient dx [n, heads, head_dim]: the transposed map
//   [g1, g2] -> [g1*cos + g2*sin, g2*cos - g1*sin],
// i.e. the rotation by -angle, times YaRN's attention_scaling (which is in cos and sin).
void rope_backward(float* dx, int64_t n, int heads, int head_dim, int64_t first_position,
                   const RopeFrequencies& freqs);

}  // namespace ossrl
