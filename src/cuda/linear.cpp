#include "cuda/linear.h"

#include <cublasLt.h>
#include <cublas_v2.h>

#include <memory>

#include "core/error.h"
#include "cuda/gemv.h"

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

// cuBLASLt descriptors, destroyed with their owner.
struct DestroyDesc {
  void operator()(cublasLtMatmulDescOpaque_t* d) const { cublasLtMatmulDescDestroy(d); }
  void operator()(cublasLtMatrixLayoutOpaque_t* l) const { cublasLtMatrixLayoutDestroy(l); }
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, DestroyDesc>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, DestroyDesc>;
using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, DestroyDesc>;

Layout layout(cudaDataType type, int rows, int cols, int ld) {
  cublasLtMatrixLayout_t l = nullptr;
  check_cublas(cublasLtMatrixLayoutCreate(&l, type, uint64_t(rows), uint64_t(cols), int64_t(ld)),
               "cublasLtMatrixLayoutCreate");
  return Layout(l);
}

}  // namespace

Blas::Blas(cudaStream_t stream) : stream_(stream), workspace_(kWorkspaceBytes, "cuBLAS workspace") {
  cublasHandle_t handle = nullptr;
  check_cublas(cublasCreate(&handle), "cublasCreate");
  handle_ = handle;
  // cublasSetStream resets the workspace to cuBLAS's own pool, so the workspace comes after.
  check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
  check_cublas(cublasSetWorkspace(handle, workspace_.data(), workspace_.bytes()), "cublasSetWorkspace");
  cublasLtHandle_t lt = nullptr;
  check_cublas(cublasLtCreate(&lt), "cublasLtCreate");
  lt_handle_ = lt;
}

Blas::~Blas() {
  if (lt_handle_ != nullptr) cublasLtDestroy(static_cast<cublasLtHandle_t>(lt_handle_));
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
  // cuBLASLt, so the bias is added in the GEMM's epilogue rather than by another pass over y.
  // Column-major view: yᵀ [out, n] = W [out, in] (stored as Wᵀ, column-major [in, out]) · xᵀ [in, n]
  // (+ bias per row of yᵀ).
  cublasLtMatmulDesc_t raw_desc = nullptr;
  check_cublas(cublasLtMatmulDescCreate(&raw_desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const MatmulDesc desc(raw_desc);
  const cublasOperation_t transpose = CUBLAS_OP_T;
  check_cublas(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)),
               "cublasLtMatmulDescSetAttribute (transa)");
  if (bias != nullptr) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    check_cublas(
        cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)),
        "cublasLtMatmulDescSetAttribute (epilogue)");
    check_cublas(
        cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)),
        "cublasLtMatmulDescSetAttribute (bias)");
  }
  const Layout w_layout = layout(CUDA_R_16BF, in, out, in), x_layout = layout(CUDA_R_16BF, in, n, in);
  const Layout y_layout = layout(CUDA_R_32F, out, n, out);
  // The heuristic's first choice with the workspace allowed (split-K kernels need it).
  const auto lt = static_cast<cublasLtHandle_t>(blas.lt_handle());
  cublasLtMatmulPreference_t raw_preference = nullptr;
  check_cublas(cublasLtMatmulPreferenceCreate(&raw_preference), "cublasLtMatmulPreferenceCreate");
  const Preference preference(raw_preference);
  const size_t workspace_bytes = blas.workspace_bytes();
  check_cublas(cublasLtMatmulPreferenceSetAttribute(preference.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &workspace_bytes, sizeof(workspace_bytes)),
               "cublasLtMatmulPreferenceSetAttribute");
  cublasLtMatmulHeuristicResult_t choice{};
  int found = 0;
  check_cublas(cublasLtMatmulAlgoGetHeuristic(lt, desc.get(), w_layout.get(), x_layout.get(), y_layout.get(),
                                              y_layout.get(), preference.get(), 1, &choice, &found),
               "cublasLtMatmulAlgoGetHeuristic (linear_forward)");
  if (found == 0) fail("linear_forward: cuBLASLt has no algorithm for n {}, in {}, out {}", n, in, out);
  check_cublas(cublasLtMatmul(lt, desc.get(), &alpha, w, w_layout.get(), x, x_layout.get(), &beta, y, y_layout.get(),
                              y, y_layout.get(), &choice.algo, blas.workspace(), workspace_bytes, blas.stream()),
               "cublasLtMatmul (linear_forward)");
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
