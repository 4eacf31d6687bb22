// Log-probabilities of chosen tokens under the lm_head, forward and backward, fused so that
// no [tokens, vocab] tensor ever exists: the logits are made one block of rows x vocabulary
// at a time (cuBLAS into a fixed workspace) and folded into an online log-sum-exp; backward
// makes them again and turns each block straight into its share of dhidden. What GRPO's loss
// needs at 201,088 tokens of vocabulary. model/cpu/lm_head.h is the oracle.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/buffer.h"
#include "cuda/linear.h"

namespace ossrl::cuda {

class LmHeadLogprobs {
 public:
  // Sized for calls of up to max_rows rows; workspace_bytes bounds the logits block (rows x
  // vocabulary chunk, fp32 plus its bf16 gradient), so memory is fixed whatever the vocabulary.
  // The block takes as many rows as fit beside an 8192-wide chunk (each block of rows reads all
  // of lm_head), then the widest chunk, a multiple of 256, that fits; 1 GiB and 4096 rows give 4096 x
  // 43520 at gpt-oss's shape, large enough GEMMs for cuBLAS to run near its peak.
  LmHeadLogprobs(int max_rows, int hidden, int vocab, size_t workspace_bytes);
  size_t bytes() const;
  // The block: rows per GEMM, and the vocabulary chunk (the whole vocabulary when it fits).
  int rows_per_block() const { return rows_per_block_; }
  int vocab_per_block() const { return vocab_per_block_; }

  // For each row i of hidden [n, hidden] bf16 (the final norm's output of the rows that
  // predict a scored token) with lm_head w [vocab, hidden] bf16:
  //   logits_i = hidden_i · wᵀ (fp32 accumulation), lse[i] = logsumexp(logits_i),
  //   logp[i] = logits_i[targets[i]] - lse[i],
  //   entropy[i] = lse[i] - Σ_v softmax(logits_i)_v · logits_i[v]   (entropy may be null).
  // targets [n] int32, logp / lse / entropy [n] fp32, all on the device.
  void forward(Blas& blas, float* logp, float* lse, float* entropy, const __nv_bfloat16* hidden,
               const __nv_bfloat16* w, const int32_t* targets, int n);

  // dhidden [n, hidden] fp32 (overwritten) = Σ_v dlogits[i, v] · w[v] with
  // dlogits[i, v] = dlogp[i] · (1[v == targets[i]] - exp(logits_i[v] - lse[i])), given the
  // forward's lse. dlogp [n] fp32. The entropy gets no gradient (as the CPU policy).
  void backward(Blas& blas, float* dhidden, const float* dlogp, const __nv_bfloat16* hidden, const __nv_bfloat16* w,
                const int32_t* targets, const float* lse, int n);

 private:
  void check_rows(int n, const char* call) const;

  int max_rows_ = 0, hidden_ = 0, vocab_ = 0;
  int rows_per_block_ = 0, vocab_per_block_ = 0;
  int row_stride_ = 0;                    // of the blocks: vocab_per_block rounded up to 8
  DeviceBuffer<float> logits_;            // [rows_per_block, row_stride]
  DeviceBuffer<__nv_bfloat16> dlogits_;   // [rows_per_block, row_stride]
  DeviceBuffer<float> partial_;           // the online log-sum-exp's running state per row
};

}  // namespace ossrl::cuda
