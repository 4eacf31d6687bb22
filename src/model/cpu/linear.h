// Matrix products against checkpoint weights, decoding them on the fly.
#pragma once

#include <cstdint>

#include "model/weights.h"

namespace ossrl {

// y [n, w.out] = x [n, w.in] · Wᵀ (+ bias [w.out] when not null), fp32 accumulation.
// Each weight row is decoded once and used for all n tokens, so MXFP4 and bf16 cost one
// decode per call, not one per token.
void linear_forward(float* y, const float* x, const WeightMatrix& w, const float* bias, int64_t n);

// out [n, w.in] = rows tokens[0..n) of the table w [vocab, hidden]. Throws an Error for a
// token id outside [0, vocab).
void embedding_forward(float* out, const int32_t* tokens, int64_t n, const WeightMatrix& w);

}  // namespace ossrl
