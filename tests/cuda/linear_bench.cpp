// Times the dense linear (cuda/linear.h) at gpt-oss-20b's shapes (qkv, o_proj, router, lm_head)
// through cuBLAS (GEMM plus the bias pass) and through the skinny kernel (cuda/gemv.h), for the
// row counts of decode and small prefill: per call time and bandwidth (W, x, y and bias bytes)
// against 3.0 TB/s. linear_forward's choice of kernel (kSkinnyMaxRows in cuda/gemv.h) comes
// from this table.
//
// Each timed call starts with a cold L2, as in the engine, where every layer brings new
// weights: 256 MiB are read in between, untimed. Read, not written: a memset leaves L2 full of
// dirty lines whose write-back, as the matmul evicts them, adds to its traffic (+17 µs on
// lm_head on an H100), where the engine's ops before a projection mostly read. And without a
// host synchronisation: after the GPU idles, a timed call also counts its launch and the
// clocks' ramp (5 to 10 µs more on the small shapes in one run that synchronised).
// Usage: linear_bench [iterations [rows...]]   (default: 50, rows 1 2 4 8 16 32 64)
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "cuda/buffer.h"
#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/gemv.h"
#include "cuda/linear.h"
#include "cuda/random_init.h"
#include "gpu_bench.h"

namespace ossrl {
namespace {

constexpr double kPeakBytesPerSecond = 3.0e12;

struct Projection {
  const char* name;
  int in, out;
  bool bias, accumulate;  // as the engine calls it
};
constexpr Projection kProjections[] = {
    {"qkv", 2880, 5120, true, false},
    {"o_proj", 4096, 2880, true, true},
    {"router", 2880, 32, false, false},
    {"lm_head", 2880, 201088, false, false},
};

// Filled on the GPU: lm_head alone is 579M values, too many to draw on the host.
cuda::DeviceBuffer<uint16_t> random_bf16(size_t n, float stddev, uint64_t seed) {
  cuda::DeviceBuffer<uint16_t> buffer(n, "bf16 operand");
  cuda::random_uniform_bf16(reinterpret_cast<__nv_bfloat16*>(buffer.data()), n, 0.0f, stddev, seed, nullptr);
  return buffer;
}

// Evicts L2 by summing 256 MiB through cuBLAS, which reads them all and writes one float; the
// sum goes to device memory so the call does not wait for it.
class L2Flush {
 public:
  explicit L2Flush(cuda::Blas& blas) : handle_(static_cast<cublasHandle_t>(blas.handle())) {
    OSSRL_CUDA_CHECK(cudaMemset(data_.data(), 0, data_.bytes()));
  }
  void operator()() {
    // linear_forward passes alpha and beta from the host: device pointers for this call only.
    check(cublasSetPointerMode(handle_, CUBLAS_POINTER_MODE_DEVICE));
    check(cublasSasum(handle_, int(data_.size()), data_.data(), 1, sum_.data()));
    check(cublasSetPointerMode(handle_, CUBLAS_POINTER_MODE_HOST));
  }

 private:
  static void check(cublasStatus_t status) {
    if (status != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cuBLAS call of the L2 flush failed");
  }
  cublasHandle_t handle_;
  cuda::DeviceBuffer<float> data_{size_t(64) << 20, "L2 flush"};
  cuda::DeviceBuffer<float> sum_{1, "L2 flush sum"};
};

// Mean seconds of `call` over `iterations` calls, each after an L2 flush (untimed).
template <class Call>
double time_calls(Call call, int iterations, L2Flush& flush) {
  for (int i = 0; i < 3; ++i) call();  // warm-up: module load, cuBLAS heuristics
  test::EventTimer timer;
  double total_ms = 0;
  for (int i = 0; i < iterations; ++i) {
    flush();
    total_ms += timer.ms(call);
  }
  return total_ms / 1e3 / iterations;
}

void bench(const Projection& p, int iterations, const std::vector<int>& row_counts, cuda::Blas& blas,
           L2Flush& flush) {
  const int max_rows = *std::max_element(row_counts.begin(), row_counts.end());
  const cuda::DeviceBuffer<uint16_t> w = random_bf16(size_t(p.out) * p.in, 0.02f, 1);
  const cuda::DeviceBuffer<uint16_t> x = random_bf16(size_t(max_rows) * p.in, 1.0f, 2);
  const cuda::DeviceBuffer<float> bias(std::vector<float>(size_t(p.out), 0.01f), "bias");
  cuda::DeviceBuffer<float> y(size_t(max_rows) * p.out, "y");
  OSSRL_CUDA_CHECK(cudaMemset(y.data(), 0, y.bytes()));
  const auto* wp = reinterpret_cast<const __nv_bfloat16*>(w.data());
  const auto* xp = reinterpret_cast<const __nv_bfloat16*>(x.data());

  std::printf("\n%s: in %d, out %d%s%s; W %.1f MB; mean of %d cold-L2 calls\n", p.name, p.in, p.out,
              p.bias ? ", bias" : "", p.accumulate ? ", accumulate" : "", 2e-6 * double(p.out) * p.in, iterations);
  std::printf("%5s | %9s %8s %7s | %9s %8s %7s | %8s\n", "rows", "cuBLAS us", "GB/s", "%3TB/s", "skinny us", "GB/s",
              "%3TB/s", "speed-up");
  for (int n : row_counts) {
    const double bytes = 2.0 * p.out * p.in + 2.0 * n * p.in + 4.0 * n * p.out * (p.accumulate ? 2 : 1) +
                         (p.bias ? 4.0 * p.out : 0.0);
    const auto time_kernel = [&](cuda::LinearKernel kernel) {
      return time_calls(
          [&] {
            cuda::linear_forward(blas, y.data(), xp, wp, p.bias ? bias.data() : nullptr, n, p.in, p.out, p.accumulate,
                                 kernel);
          },
          iterations, flush);
    };
    const auto report = [&](double seconds) {
      std::printf(" %9.1f %8.0f %6.1f%% |", seconds * 1e6, bytes / seconds / 1e9,
                  100.0 * bytes / seconds / kPeakBytesPerSecond);
    };
    const double cublas = time_kernel(cuda::LinearKernel::cublas);
    std::printf("%5d |", n);
    report(cublas);
    if (cuda::skinny_linear_fits(xp, wp, n, p.in)) {
      const double skinny = time_kernel(cuda::LinearKernel::skinny);
      report(skinny);
      std::printf(" %7.2fx\n", cublas / skinny);
    } else {
      std::printf(" %9s %8s %7s | %8s\n", "-", "-", "-", "-");
    }
  }
}

}  // namespace
}  // namespace ossrl

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::max(1, std::atoi(argv[1])) : 50;
  std::vector<int> rows;
  for (int i = 2; i < argc; ++i) rows.push_back(std::max(1, std::atoi(argv[i])));
  if (rows.empty()) rows = {1, 2, 4, 8, 16, 32, 64};
  return ossrl::test::bench_main("linear_bench", [&] {
    ossrl::cuda::Blas blas(nullptr);
    ossrl::L2Flush flush(blas);
    for (const auto& projection : ossrl::kProjections) ossrl::bench(projection, iterations, rows, blas, flush);
  });
}
