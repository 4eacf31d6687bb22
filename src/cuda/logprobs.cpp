#include "cuda/logprobs.h"

#include <algorithm>
#include <cstdint>

#include <cublas_v2.h>

#include "core/error.h"
#include "cuda/logprobs_kernels.h"

namespace ossrl::cuda {
namespace {

// The narrowest vocabulary chunk a block is given while the vocabulary is wider: the logits
// GEMM's N and the dhidden GEMM's K, wide enough for cuBLAS to run at its peak. Rows take the
// rest of the workspace, since every block of rows reads all of lm_head once (1.16 GB at
// gpt-oss's shape).
constexpr int64_t kMinVocabChunk = 8192;
// Chunks narrower than the vocabulary are multiples of this, so every chunk starts on whole
// GEMM tiles and 16-byte aligned rows of lm_head.
constexpr int64_t kVocabAlign = 256;
// Bytes per element of the logits block: fp32 logits and their bf16 gradient.
constexpr size_t kBlockElementBytes = sizeof(float) + sizeof(__nv_bfloat16);
constexpr int kStateFloats = sizeof(LseState) / sizeof(float);

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    fail("cuBLAS error {} ({}) in {}", cublasGetStatusName(status), cublasGetStatusString(status), call);
  }
}

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// logits [rows, width] fp32 (row stride ld) = hidden [rows, h] bf16 · w[v0 : v0 + width]ᵀ.
// Column-major view: logitsᵀ [width, rows] = W chunk [width, h] · hiddenᵀ [h, rows].
void logits_gemm(Blas& blas, float* logits, int ld, const __nv_bfloat16* hidden, const __nv_bfloat16* w, int rows,
                 int h, int v0, int width) {
  const float one = 1.0f, zero = 0.0f;
  check_cublas(cublasGemmEx(static_cast<cublasHandle_t>(blas.handle()), CUBLAS_OP_T, CUBLAS_OP_N, width, rows, h,
                            &one, w + int64_t(v0) * h, CUDA_R_16BF, h, hidden, CUDA_R_16BF, h, &zero, logits,
                            CUDA_R_32F, ld, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx (lm_head logits)");
}

// dhidden [rows, h] fp32 (= on the first chunk, += after) dlogits [rows, width] bf16 (row
// stride ld) · w[v0 : v0 + width]. Column-major: dhiddenᵀ [h, rows] = W chunkᵀ [h, width] ·
// dlogitsᵀ [width, rows].
void dhidden_gemm(Blas& blas, float* dhidden, const __nv_bfloat16* dlogits, int ld, const __nv_bfloat16* w, int rows,
                  int h, int v0, int width, bool accumulate) {
  const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  check_cublas(cublasGemmEx(static_cast<cublasHandle_t>(blas.handle()), CUBLAS_OP_N, CUBLAS_OP_N, h, rows, width,
                            &one, w + int64_t(v0) * h, CUDA_R_16BF, h, dlogits, CUDA_R_16BF, ld, &beta, dhidden,
                            CUDA_R_32F, h, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx (lm_head dhidden)");
}

}  // namespace

LmHeadLogprobs::LmHeadLogprobs(int max_rows, int hidden, int vocab, size_t workspace_bytes)
    : max_rows_(max_rows), hidden_(hidden), vocab_(vocab) {
  OSSRL_CHECK(max_rows > 0 && hidden > 0 && vocab > 0,
              "LmHeadLogprobs: max_rows, hidden and vocab must be positive, got {}, {}, {}", max_rows, hidden, vocab);
  // Rows as many as fit beside the narrowest chunk; then the chunk as wide as the rows allow.
  // A chunk holding the whole vocabulary gets a row stride padded to 16 bytes of bf16. Each row
  // also keeps its LseState, so bytes() stays within workspace_bytes.
  const int64_t workspace = int64_t(workspace_bytes);
  const int64_t narrowest = std::min(round_up(vocab, 8), kMinVocabChunk);
  const int64_t narrowest_row = narrowest * int64_t(kBlockElementBytes) + int64_t(sizeof(LseState));
  OSSRL_CHECK(workspace >= narrowest_row,
              "LmHeadLogprobs: a workspace of {} bytes is too small for one row of {} logits; give at least {} bytes",
              workspace_bytes, narrowest, narrowest_row);
  rows_per_block_ = int(std::min<int64_t>(max_rows, workspace / narrowest_row));
  const int64_t width = (workspace / rows_per_block_ - int64_t(sizeof(LseState))) / int64_t(kBlockElementBytes);
  if (width >= round_up(vocab, 8)) {
    vocab_per_block_ = vocab;
    row_stride_ = int(round_up(vocab, 8));
  } else {
    vocab_per_block_ = int(width / kVocabAlign * kVocabAlign);
    row_stride_ = vocab_per_block_;
  }
  const size_t block = size_t(rows_per_block_) * size_t(row_stride_);
  logits_ = DeviceBuffer<float>(block, "lm_head logits block");
  dlogits_ = DeviceBuffer<__nv_bfloat16>(block, "lm_head logits gradient block");
  partial_ = DeviceBuffer<float>(size_t(rows_per_block_) * kStateFloats, "lm_head log-sum-exp state");
}

size_t LmHeadLogprobs::bytes() const { return logits_.bytes() + dlogits_.bytes() + partial_.bytes(); }

void LmHeadLogprobs::check_rows(int n, const char* call) const {
  OSSRL_CHECK(n >= 0 && n <= max_rows_, "LmHeadLogprobs::{}: {} rows, sized for at most {}", call, n, max_rows_);
}

void LmHeadLogprobs::forward(Blas& blas, float* logp, float* lse, float* entropy, const __nv_bfloat16* hidden,
                             const __nv_bfloat16* w, const int32_t* targets, int n) {
  check_rows(n, "forward");
  auto* state = reinterpret_cast<LseState*>(partial_.data());
  for (int r0 = 0; r0 < n; r0 += rows_per_block_) {
    const int rows = std::min(rows_per_block_, n - r0);
    for (int v0 = 0; v0 < vocab_; v0 += vocab_per_block_) {
      const int width = std::min(vocab_per_block_, vocab_ - v0);
      logits_gemm(blas, logits_.data(), row_stride_, hidden + int64_t(r0) * hidden_, w, rows, hidden_, v0, width);
      const LogitsBlock block{logits_.data(), rows, width, row_stride_, v0, targets + r0};
      fold_logits(state, block, v0 == 0, v0 + width == vocab_, logp + r0, lse ? lse + r0 : nullptr,
                  entropy ? entropy + r0 : nullptr, blas.stream());
    }
  }
}

void LmHeadLogprobs::backward(Blas& blas, float* dhidden, const float* dlogp, const __nv_bfloat16* hidden,
                              const __nv_bfloat16* w, const int32_t* targets, const float* lse, int n) {
  check_rows(n, "backward");
  for (int r0 = 0; r0 < n; r0 += rows_per_block_) {
    const int rows = std::min(rows_per_block_, n - r0);
    for (int v0 = 0; v0 < vocab_; v0 += vocab_per_block_) {
      const int width = std::min(vocab_per_block_, vocab_ - v0);
      logits_gemm(blas, logits_.data(), row_stride_, hidden + int64_t(r0) * hidden_, w, rows, hidden_, v0, width);
      const LogitsBlock block{logits_.data(), rows, width, row_stride_, v0, targets + r0};
      logits_gradient(dlogits_.data(), block, dlogp + r0, lse + r0, blas.stream());
      dhidden_gemm(blas, dhidden + int64_t(r0) * hidden_, dlogits_.data(), row_stride_, w, rows, hidden_, v0, width,
                   v0 > 0);
    }
  }
}

}  // namespace ossrl::cuda
