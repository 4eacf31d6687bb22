#include "model/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace ossrl {

RopeFrequencies rope_frequencies(const RopeConfig& rope, int head_dim) {
  const int d = head_dim;
  const double base = rope.theta;
  const double factor = rope.factor;
  // Dimension index whose wavelength fits `rotations` turns into the original context.
  auto correction_dim = [&](double rotations) {
    return d * std::log(rope.original_max_position_embeddings / (rotations * 2 * std::numbers::pi)) /
           (2 * std::log(base));
  };
  double low = correction_dim(rope.beta_fast);
  double high = correction_dim(rope.beta_slow);
  if (rope.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(d - 1));
  if (low == high) high += 0.001;  // as transformers: avoid a zero-width ramp

  RopeFrequencies f;
  f.attention_scaling = factor <= 1.0 ? 1.0f : float(0.1 * std::log(factor) + 1.0);
  f.inv_freq.resize(size_t(d / 2));
  for (int j = 0; j < d / 2; ++j) {
    // fp32 throughout, in transformers' order, so the angles agree to the last bit.
    const float pos_freq = std::pow(float(base), float(2 * j) / float(d));
    const float extrapolation = 1.0f / pos_freq;
    const float interpolation = 1.0f / (float(factor) * pos_freq);
    const float ramp = std::clamp((float(j) - float(low)) / float(high - low), 0.0f, 1.0f);
    const float w = 1.0f - ramp;
    f.inv_freq[size_t(j)] = interpolation * (1.0f - w) + extrapolation * w;
  }
  return f;
}

}  // namespace ossrl
