// Matrix products against checkpoint weights, decoding them on the fly.
#pragma once

#include <cstdint>

#include "model/weights.h"

namespace ossrl {

// y [n, w.out] = x [n, w.in] · Wᵀ (+ bias [w.out] when not null), fp32 accumulation.
// Each weight row is decoded once and used for all n tokens, so MXFP4 and bf16 cost one
// decode per call, not one per token.
void linear_forward(float* y, const float* x, const WeightMatrix& w, const float* bias, int64_t n);

// Backward of linear_forward through a frozen weight (any format, decoded on the fly like
// the forward): dx [n, w.in] += dy [n, w.out] · W.
void linear_backward_input(float* dx, const float* dy, const WeightMatrix& w, int64_t n);

// Weight grads of y = x · Wᵀ + b for a trainable fp32 W [out, in]:
//   dw [out, in] += dyᵀ · x;  db [out] += Σ_t dy[t]   (db may be null).
// dx goes through linear_backward_input with fp32_matrix(W).
void linear_backward_weight(float* dw, float* db, const float* dy, const float* x, int64_t n,
                            int64_t out, int64_t in);

// A row-major fp32 [out, in] array seen as a WeightMatrix (trainable weights, LoRA factors).
WeightMatrix fp32_matrix(const float* data, int64_t out, int64_t in);

// Logical rows [begin, end) of a row-major (not transposed) W, as a view: a vocabulary
// chunk of lm_head. MXFP4 needs no alignment here (whole rows).
WeightMatrix weight_rows(const WeightMatrix& w, int64_t begin, int64_t end);

// out [n, w.in] = rows tokens[0..n) of the table w [vocab, hidden]. Throws an Error for a
// token id outside [0, vocab).
void embedding_forward(float* out, const int32_t* tokens, int64_t n, const WeightMatrix& w);

// Backward of embedding_forward for a trainable fp32 table: dtable [vocab, hidden] row
// tokens[t] += dout [n, hidden] row t (repeated tokens add up). gpt-oss LoRA training keeps
// the embedding frozen; this is here for completeness.
void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t n, int64_t hidden);

}  // namespace ossrl
