// Choosing the next token on the GPU, one row of logits per sequence: the same distribution
// and the same random stream as engine/sampling.h, so a rollout replays on either device.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "engine/sampling.h"

namespace ossrl::cuda {

// logits [batch, vocab] fp32. Row b draws with params[b] and the deviate
// SamplingRng::uniform(rng_keys[b], rng_draws[b]) (the draw a host SamplingRng with that key
// would make as its rng_draws[b]-th), from sampling_distribution()'s distribution by inverse
// CDF in token-id order; greedy (lowest id on ties) at temperature 0. tokens [batch] int32;
// logprobs [batch] = log softmax(logits[b])[token] at temperature 1 (SampledToken::logprob).
// params, rng_keys, rng_draws are device arrays [batch].
void sample_tokens(int32_t* tokens, float* logprobs, const float* logits, const SamplingParams* params,
                   const uint64_t* rng_keys, const uint64_t* rng_draws, int batch, int vocab,
                   cudaStream_t stream);

// out[r] = log softmax(logits[r])[targets[r]] at temperature 1, fp32 with the row max
// subtracted (engine/sampling.h's token_logprob): `ossrl score` on the GPU. logits
// [rows, vocab]; targets, out [rows].
void token_logprobs(float* out, const float* logits, const int32_t* targets, int rows, int vocab,
                    cudaStream_t stream);

}  // namespace ossrl::cuda
