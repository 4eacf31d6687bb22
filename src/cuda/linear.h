// Dense bf16 matmuls (attention projections, router, lm_head) through cuBLAS(Lt), which is the
// fastest path for plain bf16 GEMMs; the expert matmuls have their own kernels (cuda/moe.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/buffer.h"

namespace ossrl::cuda {

// Owns a cuBLAS handle bound to one stream, a cuBLASLt handle and their workspace. Not copyable.
class Blas {
 public:
  explicit Blas(cudaStream_t stream);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  cudaStream_t stream() const { return stream_; }
  void* handle() const { return handle_; }
  void* lt_handle() const { return lt_handle_; }
  void* workspace() { return workspace_.data(); }
  size_t workspace_bytes() const { return workspace_.bytes(); }

 private:
  cudaStream_t stream_;
  void* handle_ = nullptr;     // cublasHandle_t, kept opaque so this header stays light
  void* lt_handle_ = nullptr;  // cublasLtHandle_t
  // Given to cublasSetWorkspace: without it cuBLAS allocates during graph capture.
  DeviceBuffer<unsigned char> workspace_;
};

// Which kernel computes a linear_forward. `automatic` is the fastest measured for the shape:
// the skinny bandwidth-bound kernel (cuda/gemv.h) for a few rows, cuBLAS otherwise; tests and
// benches force one to compare them (forcing `skinny` where it does not fit is an error).
enum class LinearKernel { automatic, cublas, skinny };

// y [n, out] fp32 = (accumulate ? y : 0) + x [n, in] bf16 · Wᵀ + bias; W bf16 [out, in]
// (nn.Linear's layout), bias [out] fp32 or null. fp32 accumulation.
void linear_forward(Blas& blas, float* y, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* bias,
                    int n, int in, int out, bool accumulate, LinearKernel kernel = LinearKernel::automatic);

// The input gradient of linear_forward for training: dx [n, in] fp32 = (accumulate ? dx : 0)
// + dy [n, out] bf16 · W [out, in] bf16, fp32 accumulation, through cuBLAS.
void linear_backward_input(Blas& blas, float* dx, const __nv_bfloat16* dy, const __nv_bfloat16* w, int n, int in,
                           int out, bool accumulate);

}  // namespace ossrl::cuda
