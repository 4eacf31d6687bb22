#include "model/cpu/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "model/cpu/linear.h"

namespace ossrl {

namespace {

constexpr float kAlpha = 1.702f;

// The router matrix in use: the trained fp32 copy when given, else the checkpoint's.
WeightMatrix router_matrix(const MoeWeights& w, const MoeDims& d, const float* router_weight) {
  return router_weight ? fp32_matrix(router_weight, d.experts, d.hidden) : w.router;
}

// The rows (token * k + slot) routed to expert e, ascending.
void rows_of_expert(std::vector<int64_t>* rows, const int32_t* expert_index, int64_t n_rows, int e) {
  rows->clear();
  for (int64_t r = 0; r < n_rows; ++r) {
    if (expert_index[r] == e) rows->push_back(r);
  }
}

const LowRankAdapter* expert_adapter(const std::vector<LowRankAdapter>* v, int e) {
  return v && !v->empty() && (*v)[size_t(e)].active() ? &(*v)[size_t(e)] : nullptr;
}

}  // namespace

void router_forward(float* router_logits, int32_t* expert_index, float* expert_weight,
                    const float* x, int64_t n, const MoeWeights& w, const MoeDims& d,
                    const float* router_weight, const float* router_bias) {
  linear_forward(router_logits, x, router_matrix(w, d, router_weight),
                 router_bias ? router_bias : w.router_bias.data(), n);
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

void router_softmax_backward(float* dlogits, const float* dexpert_weight, const int32_t* expert_index,
                             const float* expert_weight, int64_t n, const MoeDims& d) {
  const int k = d.experts_per_token;
  std::fill(dlogits, dlogits + n * d.experts, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    const float* wt = expert_weight + t * k;
    const float* gt = dexpert_weight + t * k;
    float dot = 0.0f;
    for (int i = 0; i < k; ++i) dot += wt[i] * gt[i];
    for (int i = 0; i < k; ++i) dlogits[t * d.experts + expert_index[t * k + i]] = wt[i] * (gt[i] - dot);
  }
}

void swiglu_forward(float* h, const float* gate_up, int64_t n, int intermediate, float limit) {
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

void swiglu_backward(float* dgate_up, const float* dh, const float* gate_up, int64_t n, int intermediate,
                     float limit) {
  for (int64_t t = 0; t < n; ++t) {
    const float* gu = gate_up + t * 2 * intermediate;
    const float* g = dh + t * intermediate;
    float* dgu = dgate_up + t * 2 * intermediate;
    for (int j = 0; j < intermediate; ++j) {
      const float gate_in = gu[2 * j], up_in = gu[2 * j + 1];
      const float gate = std::min(gate_in, limit);
      const float up = std::clamp(up_in, -limit, limit);
      const float sig = 1.0f / (1.0f + std::exp(-gate * kAlpha));
      const float glu = gate * sig;
      // torch.clamp's backward passes the gradient where min <= x <= max.
      if (gate_in <= limit) dgu[2 * j] += g[j] * (up + 1.0f) * (sig + gate * kAlpha * sig * (1.0f - sig));
      if (up_in >= -limit && up_in <= limit) dgu[2 * j + 1] += g[j] * glu;
    }
  }
}

void moe_forward(float* out, MoeActivations* act, const float* x, int64_t n, const MoeWeights& w,
                 const MoeDims& d, const LayerAdapters* adapters, bool keep) {
  const int k = d.experts_per_token;
  const int64_t gu_width = 2 * int64_t(d.intermediate);
  act->router_logits.resize(size_t(n * d.experts));
  act->expert_index.resize(size_t(n * k));
  act->expert_weight.resize(size_t(n * k));
  router_forward(act->router_logits.data(), act->expert_index.data(), act->expert_weight.data(), x, n, w, d,
                 adapters ? adapters->router_weight : nullptr, adapters ? adapters->router_bias : nullptr);
  if (keep) {
    act->gate_up.assign(size_t(n * k * gu_width), 0.0f);
    act->expert_out.assign(size_t(n * k * d.hidden), 0.0f);
  } else {
    act->gate_up.clear();
    act->expert_out.clear();
  }
  std::fill(out, out + n * d.hidden, 0.0f);
  std::vector<int64_t> rows, tokens;  // (token * k + slot) routed to the current expert, and its token
  std::vector<float> xs, gate_up, h, y;
  for (int e = 0; e < d.experts; ++e) {
    rows_of_expert(&rows, act->expert_index.data(), n * k, e);
    if (rows.empty()) continue;
    const int64_t m = int64_t(rows.size());
    tokens.resize(rows.size());
    xs.resize(size_t(m * d.hidden));
    for (int64_t i = 0; i < m; ++i) {
      tokens[size_t(i)] = rows[size_t(i)] / k;
      const float* src = x + tokens[size_t(i)] * d.hidden;
      std::copy(src, src + d.hidden, xs.begin() + i * d.hidden);
    }
    gate_up.resize(size_t(m * gu_width));
    h.resize(size_t(m * d.intermediate));
    y.resize(size_t(m * d.hidden));
    linear_forward(gate_up.data(), xs.data(), w.gate_up[size_t(e)], w.gate_up_bias.data() + e * gu_width, m);
    if (const LowRankAdapter* ad = expert_adapter(adapters ? &adapters->gate_up_proj : nullptr, e)) {
      lora_forward(gate_up.data(), xs.data(), tokens.data(), m, *ad);
    }
    swiglu_forward(h.data(), gate_up.data(), m, d.intermediate, d.swiglu_limit);
    round_activations(h.data(), m * d.intermediate, d.activations);
    linear_forward(y.data(), h.data(), w.down[size_t(e)], w.down_bias.data() + int64_t(e) * d.hidden, m);
    if (const LowRankAdapter* ad = expert_adapter(adapters ? &adapters->down_proj : nullptr, e)) {
      lora_forward(y.data(), h.data(), tokens.data(), m, *ad);
    }
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = rows[size_t(i)];
      float* ot = out + (r / k) * d.hidden;
      for (int c = 0; c < d.hidden; ++c) ot[c] += y[size_t(i * d.hidden + c)] * act->expert_weight[size_t(r)];
      if (keep) {
        std::copy(gate_up.begin() + i * gu_width, gate_up.begin() + (i + 1) * gu_width,
                  act->gate_up.begin() + r * gu_width);
        std::copy(y.begin() + i * d.hidden, y.begin() + (i + 1) * d.hidden, act->expert_out.begin() + r * d.hidden);
      }
    }
  }
}

void moe_backward(float* dx, const float* dout, const float* x, int64_t n, const MoeWeights& w,
                  const MoeDims& d, const LayerAdapters* adapters, const MoeActivations& act) {
  const int k = d.experts_per_token;
  const int64_t gu_width = 2 * int64_t(d.intermediate);

  // Through the k softmax weights: dL/dweight[t, s] = dout[t] · expert_out[t*k + s].
  std::vector<float> dweight(size_t(n * k));
  for (int64_t r = 0; r < n * k; ++r) {
    const float* g = dout + (r / k) * d.hidden;
    const float* y = act.expert_out.data() + r * d.hidden;
    float dot = 0.0f;
    for (int c = 0; c < d.hidden; ++c) dot += g[c] * y[c];
    dweight[size_t(r)] = dot;
  }
  std::vector<float> dlogits(size_t(n * d.experts));
  router_softmax_backward(dlogits.data(), dweight.data(), act.expert_index.data(), act.expert_weight.data(), n, d);
  const float* trained_router = adapters ? adapters->router_weight : nullptr;
  linear_backward_input(dx, dlogits.data(), router_matrix(w, d, trained_router), n);
  if (adapters && adapters->grad_router_weight) {
    linear_backward_weight(adapters->grad_router_weight, adapters->grad_router_bias, dlogits.data(), x, n,
                           d.experts, d.hidden);
  }

  // Through each expert, rows grouped as in forward.
  std::vector<int64_t> rows, tokens;
  std::vector<float> xs, gate_up, h, dy, dh, dgate_up, dxs;
  for (int e = 0; e < d.experts; ++e) {
    rows_of_expert(&rows, act.expert_index.data(), n * k, e);
    if (rows.empty()) continue;
    const int64_t m = int64_t(rows.size());
    tokens.resize(rows.size());
    xs.resize(size_t(m * d.hidden));
    gate_up.resize(size_t(m * gu_width));
    dy.resize(size_t(m * d.hidden));
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = rows[size_t(i)];
      const int64_t t = r / k;
      tokens[size_t(i)] = t;
      std::copy(x + t * d.hidden, x + (t + 1) * d.hidden, xs.begin() + i * d.hidden);
      std::copy(act.gate_up.begin() + r * gu_width, act.gate_up.begin() + (r + 1) * gu_width,
                gate_up.begin() + i * gu_width);
      const float wr = act.expert_weight[size_t(r)];
      for (int c = 0; c < d.hidden; ++c) dy[size_t(i * d.hidden + c)] = wr * dout[t * d.hidden + c];
    }
    h.resize(size_t(m * d.intermediate));
    swiglu_forward(h.data(), gate_up.data(), m, d.intermediate, d.swiglu_limit);

    dh.assign(size_t(m * d.intermediate), 0.0f);
    linear_backward_input(dh.data(), dy.data(), w.down[size_t(e)], m);
    if (const LowRankAdapter* ad = expert_adapter(adapters ? &adapters->down_proj : nullptr, e)) {
      lora_backward(dh.data(), dy.data(), h.data(), tokens.data(), m, *ad);
    }
    dgate_up.assign(size_t(m * gu_width), 0.0f);
    swiglu_backward(dgate_up.data(), dh.data(), gate_up.data(), m, d.intermediate, d.swiglu_limit);
    dxs.assign(size_t(m * d.hidden), 0.0f);
    linear_backward_input(dxs.data(), dgate_up.data(), w.gate_up[size_t(e)], m);
    if (const LowRankAdapter* ad = expert_adapter(adapters ? &adapters->gate_up_proj : nullptr, e)) {
      lora_backward(dxs.data(), dgate_up.data(), xs.data(), tokens.data(), m, *ad);
    }
    for (int64_t i = 0; i < m; ++i) {
      float* dxt = dx + tokens[size_t(i)] * d.hidden;
      for (int c = 0; c < d.hidden; ++c) dxt[c] += dxs[size_t(i * d.hidden + c)];
    }
  }
}

}  // namespace ossrl
