// Rotary position frequencies (YaRN), computed once per model and shared by the CPU
// reference and the CUDA kernels so both rotate by the very same fp32 angles.
#pragma once

#include <vector>

#include "model/config.h"

namespace ossrl {

struct RopeFrequencies {
  std::vector<float> inv_freq;  // [head_dim / 2]
  // YaRN's mscale, multiplied into cos and sin (so into both q and k).
  float attention_scaling = 1.0f;
};

// transformers' _compute_yarn_parameters, step for step in fp32 (spec §2):
//   pos_freq[j] = theta^(2j/d); extrapolation = 1/pos_freq; interpolation = 1/(factor*pos_freq)
//   low/high = correction dims for beta_fast/beta_slow at original_max_position_embeddings
//   (floored/ceiled only when `truncate`), clamped to [0, d-1]
//   w[j] = 1 - clamp((j - low)/(high - low), 0, 1)
//   inv_freq = interpolation*(1 - w) + extrapolation*w
//   attention_scaling = 0.1*ln(factor) + 1 (1 when factor <= 1).
// With factor 1 this is plain RoPE.
RopeFrequencies rope_frequencies(const RopeConfig& rope, int head_dim);

}  // namespace ossrl
