// The elementwise passes of LmHeadLogprobs (cuda/logprobs.h) over one block of logits, between
// its cuBLAS calls. Internal to logprobs.cpp / logprobs.cu: host code that formats errors lives
// in the .cpp, kernels in the .cu.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

// One row's online log-sum-exp over the vocabulary chunks seen so far: with m the largest logit,
//   sum = Σ exp(z - m),  weighted = Σ exp(z - m) · (z - m)   (<= 0)
// so lse = m + log(sum) and entropy = log(sum) - weighted / sum, a sum of two non-negative
// terms (no cancellation between lse and E[z]). target = the target's logit, once seen.
struct LseState {
  float max;
  float sum;
  float weighted;
  float target;
};

// A block of logits: rows [rows, width] fp32 with row stride ld (a multiple of 4), the
// vocabulary entries [v0, v0 + width) of each row; targets [rows] are the rows' token ids.
struct LogitsBlock {
  const float* logits;
  int rows;
  int width;
  int ld;
  int v0;
  const int32_t* targets;
};

// Folds the block into state [rows] (overwritten on the first chunk of the vocabulary, merged
// on the others); on the last chunk writes logp, lse and entropy [rows] fp32 (lse and entropy
// may be null). One pass over the block.
void fold_logits(LseState* state, const LogitsBlock& block, bool first_chunk, bool last_chunk, float* logp, float* lse,
                 float* entropy, cudaStream_t stream);

// dlogits [rows, width] bf16, row stride block.ld, = dlogp[r] · (1[v == targets[r]] -
// exp(logits[r, v] - lse[r])): the rows' share of the loss gradient for the dhidden GEMM.
// dlogp, lse [rows] fp32. One pass over the block.
void logits_gradient(__nv_bfloat16* dlogits, const LogitsBlock& block, const float* dlogp, const float* lse,
                     cudaStream_t stream);

}  // namespace ossrl::cuda
