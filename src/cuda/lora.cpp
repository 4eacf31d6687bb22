// LoRA on a dense projection (cuda/lora.h) as four small cuBLAS GEMMs over the bf16 copies of
// A and B, fp32 accumulation. cuBLAS is column-major: a row-major [rows, cols] array with row
// stride ld is the column-major [cols, rows] matrix with leading dimension ld, so every
// product below is written for the transposes (as in cuda/linear.cpp).
#include "cuda/lora.h"

#include <cublas_v2.h>

#include "core/error.h"

namespace ossrl::cuda {

namespace {

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    fail("cuBLAS error {} ({}) in {}", cublasGetStatusName(status), cublasGetStatusString(status), call);
  }
}

// C (column-major [m, n], leading dimension ldc, type c_type) = alpha · op(A) · op(B) + beta · C,
// A and B bf16, fp32 accumulation.
void gemm(Blas& blas, cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k, float alpha,
          const __nv_bfloat16* a, int lda, const __nv_bfloat16* b, int ldb, float beta, void* c,
          cudaDataType_t c_type, int ldc, const char* what) {
  check_cublas(cublasGemmEx(static_cast<cublasHandle_t>(blas.handle()), op_a, op_b, m, n, k, &alpha, a,
                            CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb, &beta, c, c_type, ldc, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT),
               what);
}

void check_dense(const DeviceAdapter& ad, const char* where) {
  OSSRL_CHECK(ad.experts == 1 && ad.r > 0 && ad.in > 0 && ad.out > 0 && ad.a16 != nullptr && ad.b16 != nullptr,
              "{}: a single-expert adapter with r, in, out > 0 and bf16 copies of A and B is needed (got experts "
              "{}, r {}, in {}, out {})",
              where, ad.experts, ad.r, ad.in, ad.out);
}

}  // namespace

void lora_forward(Blas& blas, float* y, int ldy, const __nv_bfloat16* x, int n, const DeviceAdapter& ad,
                  __nv_bfloat16* u) {
  if (!ad.active() || n == 0) return;
  check_dense(ad, "lora_forward");
  OSSRL_CHECK(ldy >= ad.out, "lora_forward: row stride {} of y is below out {}", ldy, ad.out);
  // uᵀ [r, n] = A [r, in] · xᵀ [in, n]; u is rounded to bf16 as PEFT's lora_A output under autocast.
  gemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, ad.r, n, ad.in, 1.0f, ad.a16, ad.in, x, ad.in, 0.0f, u, CUDA_R_16BF, ad.r,
       "cublasGemmEx (lora_forward, x · Aᵀ)");
  // yᵀ [out, n] += scale · B [out, r] · uᵀ [r, n].
  gemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, ad.out, n, ad.r, ad.scale, ad.b16, ad.r, u, ad.r, 1.0f, y, CUDA_R_32F, ldy,
       "cublasGemmEx (lora_forward, u · Bᵀ)");
}

void lora_backward(Blas& blas, float* dx, const __nv_bfloat16* dy, int ld_dy, const __nv_bfloat16* x,
                   const __nv_bfloat16* u, int n, const DeviceAdapter& ad, __nv_bfloat16* v) {
  if (!ad.active() || n == 0) return;
  check_dense(ad, "lora_backward");
  OSSRL_CHECK(ld_dy >= ad.out, "lora_backward: row stride {} of dy is below out {}", ld_dy, ad.out);
  // grad_b [out, r] (column-major [r, out]) += scale · uᵀ [r, n] · dy [n, out].
  if (ad.grad_b != nullptr) {
    gemm(blas, CUBLAS_OP_N, CUBLAS_OP_T, ad.r, ad.out, n, ad.scale, u, ad.r, dy, ld_dy, 1.0f, ad.grad_b, CUDA_R_32F,
         ad.r, "cublasGemmEx (lora_backward, grad_b)");
  }
  // vᵀ [r, n] = scale · Bᵀ [r, out] · dyᵀ [out, n].
  gemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, ad.r, n, ad.out, ad.scale, ad.b16, ad.r, dy, ld_dy, 0.0f, v, CUDA_R_16BF,
       ad.r, "cublasGemmEx (lora_backward, v = scale · dy · B)");
  // grad_a [r, in] (column-major [in, r]) += xᵀ [in, n] · v [n, r].
  if (ad.grad_a != nullptr) {
    gemm(blas, CUBLAS_OP_N, CUBLAS_OP_T, ad.in, ad.r, n, 1.0f, x, ad.in, v, ad.r, 1.0f, ad.grad_a, CUDA_R_32F, ad.in,
         "cublasGemmEx (lora_backward, grad_a)");
  }
  // dxᵀ [in, n] += Aᵀ [in, r] · vᵀ [r, n].
  if (dx != nullptr) {
    gemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, ad.in, n, ad.r, 1.0f, ad.a16, ad.in, v, ad.r, 1.0f, dx, CUDA_R_32F, ad.in,
         "cublasGemmEx (lora_backward, dx)");
  }
}

}  // namespace ossrl::cuda
