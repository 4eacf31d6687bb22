// Token embedding lookup: a gather of bf16 rows widened to the fp32 residual stream.
#include "cuda/embedding.h"

#include <cstdint>

#include "cuda/check.h"

namespace ossrl::cuda {
namespace {

constexpr int kThreads = 256;

// kVec elements moved per access: 8 (16-byte loads) when rows and pointers allow it.
template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// hidden [n, hidden_size] fp32 = table [vocab, hidden_size] bf16 at row tokens[i]; one CTA per
// token.
template <int kVec>
__global__ void __launch_bounds__(kThreads) embedding_kernel(float* hidden, const __nv_bfloat16* table,
                                                             const int32_t* tokens, int hidden_size) {
  const int64_t t = blockIdx.x;
  const auto* src = reinterpret_cast<const Pack<__nv_bfloat16, kVec>*>(table + int64_t(tokens[t]) * hidden_size);
  auto* dst = reinterpret_cast<Pack<float, kVec>*>(hidden + t * hidden_size);
  for (int i = threadIdx.x; i < hidden_size / kVec; i += kThreads) {
    const Pack<__nv_bfloat16, kVec> in = src[i];
    Pack<float, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) out.v[j] = __bfloat162float(in.v[j]);
    dst[i] = out;
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

void embedding_forward(float* hidden, const __nv_bfloat16* table, const int32_t* tokens, int n,
                       int hidden_size, cudaStream_t stream) {
  if (n == 0) return;
  constexpr int kWide = 8;
  if (hidden_size % kWide == 0 && aligned(table, sizeof(Pack<__nv_bfloat16, kWide>)) &&
      aligned(hidden, sizeof(Pack<float, kWide>))) {
    embedding_kernel<kWide><<<n, kThreads, 0, stream>>>(hidden, table, tokens, hidden_size);
  } else {
    embedding_kernel<1><<<n, kThreads, 0, stream>>>(hidden, table, tokens, hidden_size);
  }
  OSSRL_CUDA_CHECK_LAUNCH();
}

}  // namespace ossrl::cuda
