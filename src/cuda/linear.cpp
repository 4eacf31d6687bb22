#include "cuda/linear.h"

#include <cublas_v2.h>

#include "core/error.h"
#include "cuda/gemv.h"
#include "cuda/linear_bias.h"

namespace ossrl::cuda {

namespace {

// cuBLAS's recommended workspace on Hopper (cublasSetWorkspace's documentation).
constexpr size_t kWorkspaceBytes = size_t(32) << 20;

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    fail("cuBLAS error {} ({}) in {}", cublasGetStatusName(status), cublasGetStatusString(status), call);
  }
}

cublasHandle_t as_handle(void* handle) { return static_cast<cublasHandle_t>(handle); }

}  // namespace

Blas::Blas(cudaStream_t stream) : stream_(stream), workspace_(kWorkspaceBytes, "cuBLAS workspace") {
  cublasHandle_t handle = nullptr;
  check_cublas(cublasCreate(&handle), "cublasCreate");
  handle_ = handle;
  // cublasSetStream resets the workspace to cuBLAS's own pool, so the workspace comes after.
  check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
  check_cublas(cublasSetWorkspace(handle, workspace_.data(), workspace_.bytes()), "cublasSetWorkspace");
}

Blas::~Blas() {
  if (handle_ != nullptr) cublasDestroy(as_handle(handle_));
}

void linear_forward(Blas& blas, float* y, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* bias,
                    int n, int in, int out, bool accumulate, LinearKernel kernel) {
  if (n == 0) return;
  const bool fits = skinny_linear_fits(x, w, n, in);
  if (kernel == LinearKernel::skinny && !fits) {
    fail("linear_forward: the skinny kernel takes 1..{} rows, `in` a multiple of 8 and 16-byte aligned x and W "
         "(got n {}, in {})",
         kSkinnyMaxRows, n, in);
  }
  // Wherever the skinny kernel fits it is the faster (kSkinnyMaxRows is the measured crossover).
  if (kernel == LinearKernel::skinny || (kernel == LinearKernel::automatic && fits)) {
    skinny_linear_forward(y, x, w, bias, n, in, out, accumulate, blas.stream());
    return;
  }
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  // Column-major view: yᵀ [out, n] = W [out, in] (stored as Wᵀ, column-major [in, out]) · xᵀ [in, n].
  check_cublas(cublasGemmEx(as_handle(blas.handle()), CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &alpha, w,
                            CUDA_R_16BF, in, x, CUDA_R_16BF, in, &beta, y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx (linear_forward)");
  if (bias != nullptr) add_row_bias(y, bias, n, out, blas.stream());
}

void linear_backward_input(Blas& blas, float* dx, const __nv_bfloat16* dy, const __nv_bfloat16* w, int n, int in,
                           int out, bool accumulate) {
  if (n == 0) return;
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  // Column-major view: dxᵀ [in, n] = W stored as Wᵀ (column-major [in, out]) · dyᵀ [out, n].
  check_cublas(cublasGemmEx(as_handle(blas.handle()), CUBLAS_OP_N, CUBLAS_OP_N, in, n, out, &alpha, w,
                            CUDA_R_16BF, in, dy, CUDA_R_16BF, out, &beta, dx, CUDA_R_32F, in, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx (linear_backward_input)");
}

}  // namespace ossrl::cuda
