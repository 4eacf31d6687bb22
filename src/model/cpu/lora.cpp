#include "model/cpu/lora.h"

#include <vector>

#include "model/cpu/linear.h"

namespace ossrl {

namespace {

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// x with the adapter's dropout applied ([n, in]); x itself when there is no dropout.
const float* dropped_input(std::vector<float>* buf, const float* x, const int64_t* row_ids, int64_t n,
                           const LowRankAdapter& ad) {
  if (ad.dropout <= 0.0f) return x;
  buf->resize(size_t(n * ad.in));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t id = row_ids ? row_ids[t] : t;
    for (int64_t i = 0; i < ad.in; ++i) {
      (*buf)[size_t(t * ad.in + i)] = x[t * ad.in + i] * lora_dropout_multiplier(ad.dropout_key, id, i, ad.dropout);
    }
  }
  return buf->data();
}

}  // namespace

float lora_dropout_multiplier(uint64_t key, int64_t row_id, int64_t feature, float p) {
  if (p <= 0.0f) return 1.0f;
  const uint64_t h = splitmix(key ^ splitmix(uint64_t(row_id) * 0x100000001b3ull + uint64_t(feature)));
  const float u = float(h >> 40) * (1.0f / 16777216.0f);  // uniform in [0, 1), 24 bits
  return u < p ? 0.0f : 1.0f / (1.0f - p);
}

uint64_t lora_dropout_key(uint64_t seed, uint64_t step, int layer, int module, int expert) {
  uint64_t h = splitmix(seed);
  for (uint64_t part : {step, uint64_t(layer), uint64_t(module), uint64_t(int64_t(expert))}) h = splitmix(h ^ part);
  return h;
}

void lora_forward(float* y, const float* x, const int64_t* row_ids, int64_t n, const LowRankAdapter& ad) {
  if (!ad.active() || n == 0) return;
  std::vector<float> dropped, u(size_t(n * ad.r)), delta(size_t(n * ad.out));
  const float* xd = dropped_input(&dropped, x, row_ids, n, ad);
  // As PEFT: lora_B(lora_A(dropout(x))) * scaling.
  linear_forward(u.data(), xd, fp32_matrix(ad.a, ad.r, ad.in), nullptr, n);
  linear_forward(delta.data(), u.data(), fp32_matrix(ad.b, ad.out, ad.r), nullptr, n);
  for (int64_t i = 0; i < n * ad.out; ++i) y[i] += delta[size_t(i)] * ad.scale;
}

void lora_backward(float* dx, const float* dy, const float* x, const int64_t* row_ids, int64_t n,
                   const LowRankAdapter& ad) {
  if (!ad.active() || n == 0) return;
  std::vector<float> dropped, u(size_t(n * ad.r)), du(size_t(n * ad.r), 0.0f);
  const float* xd = dropped_input(&dropped, x, row_ids, n, ad);
  // u = dropout(x) · Aᵀ, recomputed; y += scale · u · Bᵀ.
  linear_forward(u.data(), xd, fp32_matrix(ad.a, ad.r, ad.in), nullptr, n);
  // du = scale · dy · B.
  linear_backward_input(du.data(), dy, fp32_matrix(ad.b, ad.out, ad.r), n);
  for (float& v : du) v *= ad.scale;
  if (ad.grad_b) {
    for (float& v : u) v *= ad.scale;  // grad_b += dyᵀ · (scale · u)
    linear_backward_weight(ad.grad_b, nullptr, dy, u.data(), n, ad.out, ad.r);
  }
  if (ad.grad_a) linear_backward_weight(ad.grad_a, nullptr, du.data(), xd, n, ad.r, ad.in);
  if (!dx) return;
  if (ad.dropout <= 0.0f) {
    linear_backward_input(dx, du.data(), fp32_matrix(ad.a, ad.r, ad.in), n);
    return;
  }
  std::vector<float> dxd(size_t(n * ad.in), 0.0f);
  linear_backward_input(dxd.data(), du.data(), fp32_matrix(ad.a, ad.r, ad.in), n);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t id = row_ids ? row_ids[t] : t;
    for (int64_t i = 0; i < ad.in; ++i) {
      dx[t * ad.in + i] += dxd[size_t(t * ad.in + i)] * lora_dropout_multiplier(ad.dropout_key, id, i, ad.dropout);
    }
  }
}

}  // namespace ossrl
