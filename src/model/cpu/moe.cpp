#include "model/cpu/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "model/cpu/linear.h"

namespace ossrl {

void router_forward(float* router_logits, int32_t* expert_index, float* expert_weight,
                    const float* x, int64_t n, const MoeWeights& w, const MoeDims& d) {
  linear_forward(router_logits, x, w.router, w.router_bias.data(), n);
  const int k = d.experts_per_token;
  std::vector<int32_t> order(size_t(d.experts));
  for (int64_t t = 0; t < n; ++t) {
    const float* logits = router_logits + t * d.experts;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    // Descending order: the first chosen logit is the max.
    const float max_logit = logits[order[0]];
    float sum = 0.0f;
    for (int i = 0; i < k; ++i) {
      expert_index[t * k + i] = order[size_t(i)];
      expert_weight[t * k + i] = std::exp(logits[order[size_t(i)]] - max_logit);
      sum += expert_weight[t * k + i];
    }
    for (int i = 0; i < k; ++i) expert_weight[t * k + i] /= sum;
  }
}

void swiglu_forward(float* h, const float* gate_up, int64_t n, int intermediate, float limit) {
  constexpr float kAlpha = 1.702f;
  for (int64_t t = 0; t < n; ++t) {
    const float* gu = gate_up + t * 2 * intermediate;
    float* ht = h + t * intermediate;
    for (int j = 0; j < intermediate; ++j) {
      const float gate = std::min(gu[2 * j], limit);
      const float up = std::clamp(gu[2 * j + 1], -limit, limit);
      const float glu = gate * (1.0f / (1.0f + std::exp(-gate * kAlpha)));
      ht[j] = (up + 1.0f) * glu;
    }
  }
}

void moe_forward(float* out, float* router_logits, int32_t* expert_index, float* expert_weight,
                 const float* x, int64_t n, const MoeWeights& w, const MoeDims& d) {
  router_forward(router_logits, expert_index, expert_weight, x, n, w, d);
  const int k = d.experts_per_token;
  std::fill(out, out + n * d.hidden, 0.0f);
  std::vector<int64_t> rows;  // (token * k + slot) routed to the current expert
  std::vector<float> xs, gate_up, h, y;
  for (int e = 0; e < d.experts; ++e) {
    rows.clear();
    for (int64_t r = 0; r < n * k; ++r) {
      if (expert_index[r] == e) rows.push_back(r);
    }
    if (rows.empty()) continue;
    const int64_t m = int64_t(rows.size());
    xs.resize(size_t(m * d.hidden));
    for (int64_t i = 0; i < m; ++i) {
      const float* src = x + (rows[size_t(i)] / k) * d.hidden;
      std::copy(src, src + d.hidden, xs.begin() + i * d.hidden);
    }
    gate_up.resize(size_t(m * 2 * d.intermediate));
    h.resize(size_t(m * d.intermediate));
    y.resize(size_t(m * d.hidden));
    linear_forward(gate_up.data(), xs.data(), w.gate_up[size_t(e)],
                   w.gate_up_bias.data() + int64_t(e) * 2 * d.intermediate, m);
    swiglu_forward(h.data(), gate_up.data(), m, d.intermediate, d.swiglu_limit);
    linear_forward(y.data(), h.data(), w.down[size_t(e)], w.down_bias.data() + int64_t(e) * d.hidden, m);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = rows[size_t(i)];
      float* ot = out + (r / k) * d.hidden;
      for (int c = 0; c < d.hidden; ++c) ot[c] += y[size_t(i * d.hidden + c)] * expert_weight[r];
    }
  }
}

}  // namespace ossrl
