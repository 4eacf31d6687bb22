// The bias of a dense projection, added after the cuBLAS GEMM (cuda/linear.h): cuBLAS has no
// fp32 row-bias epilogue for a plain GEMM, and this pass over y is small next to the GEMM.
#pragma once

#include <cuda_runtime.h>

namespace ossrl::cuda {

// y [n, out] fp32 += bias [out] fp32 on every row.
void add_row_bias(float* y, const float* bias, int n, int out, cudaStream_t stream);

}  // namespace ossrl::cuda
