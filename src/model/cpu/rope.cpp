#include "model/cpu/rope.h"

#include <cmath>
#include <vector>

namespace ossrl {

void rope_cos_sin(float* cos, float* sin, int64_t position, const RopeFrequencies& freqs) {
  for (size_t j = 0; j < freqs.inv_freq.size(); ++j) {
    // The angle is rounded to fp32 before cos/sin, as transformers computes it.
    const float angle = float(position) * freqs.inv_freq[j];
    cos[j] = std::cos(angle) * freqs.attention_scaling;
    sin[j] = std::sin(angle) * freqs.attention_scaling;
  }
}

namespace {

// sign +1: the forward rotation; -1: its transpose (backward).
void rotate(float* x, int64_t n, int heads, int head_dim, int64_t first_position,
            const RopeFrequencies& freqs, float sign) {
  const int half = head_dim / 2;
#pragma omp parallel if (n * heads * head_dim >= (int64_t(1) << 16))
  {
    std::vector<float> cos(static_cast<size_t>(half)), sin(static_cast<size_t>(half));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
      rope_cos_sin(cos.data(), sin.data(), first_position + t, freqs);
      for (int h = 0; h < heads; ++h) {
        float* x1 = x + (t * heads + h) * head_dim;
        float* x2 = x1 + half;
        for (int j = 0; j < half; ++j) {
          const float a = x1[j], b = x2[j];
          const float s = sign * sin[size_t(j)];
          x1[j] = a * cos[size_t(j)] - b * s;
          x2[j] = b * cos[size_t(j)] + a * s;
        }
      }
    }
  }
}

}  // namespace

void rope_forward(float* x, int64_t n, int heads, int head_dim, int64_t first_position,
                  const RopeFrequencies& freqs) {
  rotate(x, n, heads, head_dim, first_position, freqs, 1.0f);
}

void rope_backward(float* dx, int64_t n, int heads, int head_dim, int64_t first_position,
                   const RopeFrequencies& freqs) {
  rotate(dx, n, heads, head_dim, first_position, freqs, -1.0f);
}

}  // namespace ossrl
