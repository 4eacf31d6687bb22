#include "model/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace ossrl {

namespace {

// The keys' coverage check both directions share.
void check_keys(const AttentionDims& d) {
  const int64_t last_query = d.first_query_position + d.n_queries - 1;
  const int64_t oldest_needed =
      d.sliding_window > 0 ? std::max<int64_t>(0, d.first_query_position - d.sliding_window + 1) : 0;
  OSSRL_CHECK(d.n_queries == 0 || (d.first_key_position <= oldest_needed &&
                                   d.first_key_position + d.n_keys > last_query),
              "attention: keys cover positions [{}, {}) but queries at [{}, {}] need [{}, {}]",
              d.first_key_position, d.first_key_position + d.n_keys, d.first_query_position,
              last_query, oldest_needed, last_query);
}

// x as the sum of two bf16 values hi + lo (about 16 mantissa bits): how the CUDA attention
// feeds its fp32 q to the bf16 tensor cores.
float as_bf16_pair(float x) {
  const float hi = bf16_to_f32(f32_to_bf16(x));
  return hi + bf16_to_f32(f32_to_bf16(x - hi));
}

// Rows [j_begin, j_end) of the keys query t may see.
void key_range(const AttentionDims& d, int64_t t, int64_t* j_begin, int64_t* j_end) {
  const int64_t p = d.first_query_position + t;
  const int64_t u_begin = d.sliding_window > 0 ? std::max<int64_t>(0, p - d.sliding_window + 1) : 0;
  *j_begin = u_begin - d.first_key_position;
  *j_end = p - d.first_key_position + 1;
}

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const float* sinks, const AttentionDims& d) {
  check_keys(d);
  const int group = d.heads / d.kv_heads;
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  const int64_t q_stride = int64_t(d.heads) * d.head_dim;
  const int64_t kv_stride = int64_t(d.kv_heads) * d.head_dim;
  // Bf16: the scores as the CUDA kernel forms them, in log2 units (exp2 for exp) from q scaled
  // by log2(e)/sqrt(head_dim) and held as a bf16 pair; `unit` turns nats into the scores' units.
  const bool bf16 = d.activations == Activations::Bf16;
  constexpr float kLog2e = 1.4426950408889634f;
  const float unit = bf16 ? kLog2e : 1.0f;
  const float score_scale = bf16 ? 1.0f : scale;
  const float q_scale = kLog2e / std::sqrt(float(d.head_dim));
  auto exp_units = [bf16](float x) { return bf16 ? std::exp2(x) : std::exp(x); };

  // Tiny problems run on one thread: a parallel region costs more than they do.
#pragma omp parallel if (d.n_queries * d.heads * d.n_keys * d.head_dim >= (int64_t(1) << 18))
  {
    std::vector<float> scores(size_t(d.n_keys)), q_pair(bf16 ? size_t(d.head_dim) : 0);
#pragma omp for schedule(static)
    for (int64_t th = 0; th < d.n_queries * d.heads; ++th) {
      const int64_t t = th / d.heads;
      const int h = int(th % d.heads);
      const int g = h / group;
      int64_t j_begin, j_end;
      key_range(d, t, &j_begin, &j_end);
      const float* qt = q + t * q_stride + int64_t(h) * d.head_dim;
      if (bf16) {
        for (int i = 0; i < d.head_dim; ++i) q_pair[size_t(i)] = as_bf16_pair(qt[i] * q_scale);
        qt = q_pair.data();
      }

      float max_logit = sinks[h] * unit;
      for (int64_t j = j_begin; j < j_end; ++j) {
        const float* kj = k + j * kv_stride + int64_t(g) * d.head_dim;
        float dot = 0.0f;
        for (int i = 0; i < d.head_dim; ++i) dot += qt[i] * kj[i];
        scores[size_t(j)] = dot * score_scale;
        max_logit = std::max(max_logit, scores[size_t(j)]);
      }
      for (int64_t j = j_begin; j < j_end; ++j) scores[size_t(j)] = exp_units(scores[size_t(j)] - max_logit);
      round_activations(scores.data() + j_begin, j_end - j_begin, d.activations);
      float denom = exp_units(sinks[h] * unit - max_logit);
      for (int64_t j = j_begin; j < j_end; ++j) denom += scores[size_t(j)];
      float* ot = out + t * q_stride + int64_t(h) * d.head_dim;
      std::fill(ot, ot + d.head_dim, 0.0f);
      for (int64_t j = j_begin; j < j_end; ++j) {
        const float w = scores[size_t(j)] / denom;
        const float* vj = v + j * kv_stride + int64_t(g) * d.head_dim;
        for (int i = 0; i < d.head_dim; ++i) ot[i] += w * vj[i];
      }
      if (lse) lse[t * d.heads + h] = max_logit / unit + std::log(denom);
    }
  }
}

void attention_backward(float* dq, float* dk, float* dv, float* dsinks, const float* dout,
                        const float* q, const float* k, const float* v, const float* sinks,
                        const float* out, const float* lse, const AttentionDims& d) {
  check_keys(d);
  const int group = d.heads / d.kv_heads;
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  const int64_t q_stride = int64_t(d.heads) * d.head_dim;
  const int64_t kv_stride = int64_t(d.kv_heads) * d.head_dim;
  // One thread per kv head: it alone writes that head's dk, dv and its query heads' dq
  // and dsinks, so nothing is shared.
#pragma omp parallel for schedule(static) \
    if (d.n_queries * d.heads * d.n_keys * d.head_dim >= (int64_t(1) << 18))
  for (int g = 0; g < d.kv_heads; ++g) {
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int64_t t = 0; t < d.n_queries; ++t) {
        int64_t j_begin, j_end;
        key_range(d, t, &j_begin, &j_end);
        const float* qt = q + t * q_stride + int64_t(h) * d.head_dim;
        const float* ot = out + t * q_stride + int64_t(h) * d.head_dim;
        const float* gt = dout + t * q_stride + int64_t(h) * d.head_dim;
        float* dqt = dq + t * q_stride + int64_t(h) * d.head_dim;
        const float l = lse[t * d.heads + h];
        float D = 0.0f;
        for (int i = 0; i < d.head_dim; ++i) D += gt[i] * ot[i];
        if (dsinks) dsinks[h] -= std::exp(sinks[h] - l) * D;
        for (int64_t j = j_begin; j < j_end; ++j) {
          const float* kj = k + j * kv_stride + int64_t(g) * d.head_dim;
          const float* vj = v + j * kv_stride + int64_t(g) * d.head_dim;
          float dot = 0.0f, dp = 0.0f;
          for (int i = 0; i < d.head_dim; ++i) {
            dot += qt[i] * kj[i];
            dp += gt[i] * vj[i];
          }
          const float p = std::exp(dot * scale - l);
          const float ds = p * (dp - D) * scale;
          float* dkj = dk + j * kv_stride + int64_t(g) * d.head_dim;
          float* dvj = dv + j * kv_stride + int64_t(g) * d.head_dim;
          for (int i = 0; i < d.head_dim; ++i) {
            dqt[i] += ds * kj[i];
            dkj[i] += ds * qt[i];
            dvj[i] += p * gt[i];
          }
        }
      }
    }
  }
}

}  // namespace ossrl
