// Next-token log-probs through lm_head without a [tokens, vocab] block: logits are formed
// a few rows by a vocabulary chunk at a time and reduced by an online log-sum-exp; the
// backward recomputes each chunk's logits.
#pragma once

#include <cstdint>
#include <span>

#include "model/weights.h"

namespace ossrl {

// For a ragged batch (sequence b is tokens[offsets[b] .. offsets[b+1])) and hidden
// [tokens, hidden] (the final-normed states), for every token t with a predecessor in its
// sequence, with z = hidden[t-1] · lm_headᵀ:
//   lse[t] = log Σ_v exp(z_v);  logp[t] = z[tokens[t]] - lse[t];
//   entropy[t] = lse[t] - Σ_v softmax(z)_v z_v.
// At each sequence's first token all three are 0. logp [tokens]; lse and entropy [tokens]
// or null (backward needs lse). wanted [tokens] (empty: all): tokens with wanted[t] == 0 are
// skipped and read 0, since each row costs hidden·vocab multiply-adds (a trainer needs only
// the completion's).
void next_token_log_probs(float* logp, float* lse, float* entropy, const float* hidden,
                          std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                          const WeightMatrix& lm_head, std::span<const uint8_t> wanted = {});

// Backward for logp only (entropy is a diagnostic, not differentiated): given dlogp
// [tokens] (ignored at sequence starts; rows with 0 are skipped),
//   dz = dlogp[t] · (onehot(tokens[t]) - softmax(z)),  dhidden[t-1] += dz · lm_head.
// dhidden [tokens, hidden] accumulates; lse from the forward.
void next_token_log_probs_backward(float* dhidden, const float* dlogp, const float* hidden,
                                   std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                                   const float* lse, const WeightMatrix& lm_head);

}  // namespace ossrl
