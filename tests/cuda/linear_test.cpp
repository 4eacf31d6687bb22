// The dense linear (cuda/linear.h) against the CPU oracle's linear_forward, through each kernel
// (cuBLAS, the skinny kernel of cuda/gemv.h, and the automatic choice) over a table of row
// counts and gpt-oss-20b's shapes (qkv, o_proj, router) plus small and ragged ones, with and
// without bias and accumulation; and the skinny kernel's graph capture and determinism.
//
// Tolerance: x and W are rounded to bf16 for both sides, and a product of two bf16 values is
// exact in fp32 (8 + 8 significant bits), so the GPU and the CPU compute the same sums and
// differ only in the order of their fp32 additions. On random data that error grows like
// sqrt(in) · 2^-24 · |y|, about 4e-6 of max |y| at in = 4096, while a wrong fragment map, a
// dropped k chunk, a missing bias or accumulation is off by at least ~1e-2 of max |y|. So
// 1e-4 · max |y| (per call) passes every summation order and catches any such mistake.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include "core/error.h"
#include "cuda/gemv.h"
#include "cuda/linear.h"
#include "gpu_test.h"
#include "model/cpu/linear.h"

namespace ossrl {
namespace {

using cuda::LinearKernel;
using test::bf16_ptr;
using test::normal_vector;
using test::round_bf16;
using test::to_device_bf16;

constexpr double kRelativeTolerance = 1e-4;
constexpr int kRowCounts[] = {1, 2, 3, 8, 9, 17, 64};
constexpr int kMaxRows = 64;

struct Shape {
  int in, out;
};
// gpt-oss-20b's qkv, o_proj and router (the last two split k over a cluster in the skinny
// kernel); a tiny fixture's; `in` off 32 and `out` off 16 (partial k chunk and row tile), with
// one warp and with a cluster; `in` off 8 (cuBLAS only).
constexpr Shape kShapes[] = {{2880, 5120}, {4096, 2880}, {2880, 32}, {64, 128}, {72, 40}, {1000, 24}, {60, 24}};

const char* kernel_name(LinearKernel kernel) {
  switch (kernel) {
    case LinearKernel::automatic: return "automatic";
    case LinearKernel::cublas: return "cublas";
    case LinearKernel::skinny: return "skinny";
  }
  return "?";
}

// One shape's operands on both sides; `product` = x · Wᵀ from the CPU oracle for all kMaxRows rows
// (row t does not depend on how many rows a call takes, so every n uses its first rows).
struct Operands {
  Shape shape;
  std::vector<float> x, w, bias, y0, product;
  cuda::DeviceBuffer<uint16_t> d_x, d_w;
  cuda::DeviceBuffer<float> d_bias;

  explicit Operands(Shape s, uint64_t seed) : shape(s) {
    x = round_bf16(normal_vector(size_t(kMaxRows) * s.in, seed, 1.0f));
    w = round_bf16(normal_vector(size_t(s.out) * s.in, seed + 1, 1.0f));
    // Bias and the accumulated y at the scale of the product (sqrt(in)), so dropping either shows.
    const float scale = std::sqrt(float(s.in));
    bias = normal_vector(size_t(s.out), seed + 2, scale);
    y0 = normal_vector(size_t(kMaxRows) * s.out, seed + 3, scale);
    product.resize(size_t(kMaxRows) * s.out);
    linear_forward(product.data(), x.data(), fp32_matrix(w.data(), s.out, s.in), nullptr, kMaxRows);
    d_x = to_device_bf16(x);
    d_w = to_device_bf16(w);
    d_bias = cuda::DeviceBuffer<float>(bias);
  }

  // The first n rows of (accumulate ? y0 : 0) + product + bias.
  std::vector<float> want(int n, bool with_bias, bool accumulate) const {
    std::vector<float> y(size_t(n) * shape.out);
    for (int t = 0; t < n; ++t) {
      for (int o = 0; o < shape.out; ++o) {
        const size_t i = size_t(t) * shape.out + o;
        y[i] = (accumulate ? y0[i] : 0.0f) + product[i] + (with_bias ? bias[size_t(o)] : 0.0f);
      }
    }
    return y;
  }

  // linear_forward through `kernel` on the first n rows, y starting as y0.
  std::vector<float> run(cuda::Blas& blas, int n, bool with_bias, bool accumulate, LinearKernel kernel) const {
    cuda::DeviceBuffer<float> y(std::vector<float>(y0.begin(), y0.begin() + ptrdiff_t(n) * shape.out));
    cuda::linear_forward(blas, y.data(), bf16_ptr(d_x), bf16_ptr(d_w), with_bias ? d_bias.data() : nullptr, n, shape.in,
                         shape.out, accumulate, kernel);
    // download() waits on the legacy stream, which does not wait on a non-blocking blas stream.
    EXPECT_EQ(cudaStreamSynchronize(blas.stream()), cudaSuccess);
    return y.download();
  }
};

// Fails once per call, naming the worst element as (token, feature) with both values.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, int out, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_want = 0.0;
  for (float v : want) max_want = std::max(max_want, double(std::abs(v)));
  const double tolerance = kRelativeTolerance * max_want;
  size_t bad = 0, worst = 0;
  double worst_error = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double error = std::abs(double(got[i]) - double(want[i]));
    if (!(error <= tolerance)) ++bad;  // NaN counts
    if (!(error <= worst_error)) worst_error = error, worst = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " outputs beyond " << tolerance
                     << " (1e-4 of max |y| " << max_want << "); worst at token " << worst / size_t(out)
                     << ", feature " << worst % size_t(out) << ": got " << got[worst] << ", want " << want[worst];
}

TEST(CudaLinear, MatchesCpuForEveryKernelShapeAndRowCount) {
  OSSRL_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  uint64_t seed = 1;
  for (const Shape& shape : kShapes) {
    const Operands operands(shape, seed += 10);
    for (int n : kRowCounts) {
      const bool skinny_fits = cuda::skinny_linear_fits(bf16_ptr(operands.d_x), bf16_ptr(operands.d_w), n, shape.in);
      for (LinearKernel kernel : {LinearKernel::automatic, LinearKernel::cublas, LinearKernel::skinny}) {
        if (kernel == LinearKernel::skinny && !skinny_fits) continue;
        for (const bool with_bias : {false, true}) {
          for (const bool accumulate : {false, true}) {
            const std::string what = std::string(kernel_name(kernel)) + " n " + std::to_string(n) + ", in " +
                                     std::to_string(shape.in) + ", out " + std::to_string(shape.out) +
                                     (with_bias ? ", bias" : "") + (accumulate ? ", accumulate" : "");
            expect_close(operands.run(blas, n, with_bias, accumulate, kernel), operands.want(n, with_bias, accumulate),
                         shape.out, what);
          }
        }
      }
    }
  }
}

TEST(CudaLinear, SkinnyRefusesWhatItCannotTake) {
  OSSRL_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  const Operands operands({64, 16}, 7);
  EXPECT_THROW(operands.run(blas, cuda::kSkinnyMaxRows + 1, true, false, LinearKernel::skinny), Error);
  const Operands ragged({60, 16}, 8);
  EXPECT_THROW(ragged.run(blas, 1, true, false, LinearKernel::skinny), Error);
}

// The engine captures decode steps in CUDA graphs: the skinny kernel must capture (no
// allocation or synchronisation) and, summing in a fixed order, replay to the same bits.
TEST(CudaLinear, SkinnyCapturesInAGraphAndIsDeterministic) {
  OSSRL_REQUIRE_GPU();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  {
    cuda::Blas blas(stream);
    const Shape shape{4096, 2880};
    const Operands operands(shape, 21);
    constexpr int n = 5;
    const std::vector<float> eager = operands.run(blas, n, true, true, LinearKernel::skinny);
    expect_close(eager, operands.want(n, true, true), shape.out, "eager skinny");

    cuda::DeviceBuffer<float> y(std::vector<float>(operands.y0.begin(), operands.y0.begin() + n * shape.out));
    cudaGraph_t graph = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    cuda::linear_forward(blas, y.data(), bf16_ptr(operands.d_x), bf16_ptr(operands.d_w), operands.d_bias.data(), n,
                         shape.in, shape.out, true, LinearKernel::skinny);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const std::vector<float> replayed = y.download();
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    for (size_t i = 0; i < eager.size(); ++i) {
      ASSERT_EQ(replayed[i], eager[i]) << "graph replay differs from the eager call at token " << i / shape.out
                                       << ", feature " << i % shape.out;
    }
  }
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace ossrl
