#include "model/cpu/rmsnorm.h"

#include <cmath>

namespace ossrl {

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t n,
                     int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (n * dim >= (int64_t(1) << 16))
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * dim;
    float sum_sq = 0.0f;
    for (int64_t i = 0; i < dim; ++i) sum_sq += xt[i] * xt[i];
    const float r = 1.0f / std::sqrt(sum_sq / float(dim) + eps);
    if (rstd) rstd[t] = r;
    float* ot = out + t * dim;
    // weight * (x * r), in that order, as transformers rounds it.
    for (int64_t i = 0; i < dim; ++i) ot[i] = weight[i] * (xt[i] * r);
  }
}

void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x, const float* weight,
                      const float* rstd, int64_t n, int64_t dim) {
#pragma omp parallel for schedule(static) if (n * dim >= (int64_t(1) << 16))
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * dim;
    const float* gt = dout + t * dim;
    const float r = rstd[t];
    float dot = 0.0f;
    for (int64_t i = 0; i < dim; ++i) dot += gt[i] * weight[i] * (xt[i] * r);
    const float mean = dot / float(dim);
    float* dxt = dx + t * dim;
    for (int64_t i = 0; i < dim; ++i) dxt[i] += r * (gt[i] * weight[i] - xt[i] * r * mean);
  }
  if (dweight) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t i = 0; i < dim; ++i) dweight[i] += dout[t * dim + i] * (x[t * dim + i] * rstd[t]);
    }
  }
}

}  // namespace ossrl
