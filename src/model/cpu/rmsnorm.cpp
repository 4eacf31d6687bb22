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

}  // namespace ossrl
