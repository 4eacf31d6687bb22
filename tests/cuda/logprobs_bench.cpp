// Times the lm_head's chunked log-probs (cuda/logprobs.h), forward and backward, at gpt-oss's
// shape (hidden 2880, vocabulary 201088) for a training micro-batch of scored rows, per
// workspace size (which sets the block of rows x vocabulary chunk), against one plain cuBLAS
// GEMM of the whole [rows, vocab] logits as the yardstick of what the GEMMs alone can reach.
// Forward is one GEMM (2·rows·hidden·vocab flops) and one pass over the logits (timed alone
// too: its GEMMs block by block); backward is two GEMMs (the logits again, then dhidden) and
// one pass.
// Usage: logprobs_bench [iterations [rows [workspace_mib...]]]   (default: 5, 4096, 256 1024 2048)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/buffer.h"
#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/linear.h"
#include "cuda/logprobs.h"
#include "cuda/random_init.h"
#include "gpu_bench.h"

namespace ossrl {
namespace {

constexpr int kHidden = 2880;
constexpr int kVocab = 201088;

double tflops(double flops, double ms) { return flops / (ms * 1e-3) / 1e12; }

void bench(int iterations, int rows, const std::vector<size_t>& workspaces_mib) {
  cuda::DeviceBuffer<__nv_bfloat16> w(size_t(kVocab) * kHidden, "lm_head");
  cuda::DeviceBuffer<__nv_bfloat16> hidden(size_t(rows) * kHidden, "hidden rows");
  cuda::random_uniform_bf16(w.data(), w.size(), 0.0f, 0.02f, 1, nullptr);
  cuda::random_uniform_bf16(hidden.data(), hidden.size(), 0.0f, 1.0f, 2, nullptr);
  std::vector<int32_t> targets(static_cast<size_t>(rows));
  std::mt19937_64 rng(3);
  for (int32_t& t : targets) t = int32_t(rng() % kVocab);
  const cuda::DeviceBuffer<int32_t> targets_d(targets, "targets");
  const cuda::DeviceBuffer<float> dlogp(std::vector<float>(size_t(rows), 1.0f / float(rows)), "dlogp");
  cuda::DeviceBuffer<float> logp(size_t(rows), "logp"), lse(size_t(rows), "lse"), entropy(size_t(rows), "entropy");
  cuda::DeviceBuffer<float> dhidden(size_t(rows) * kHidden, "dhidden");
  cuda::Blas blas(nullptr);
  const double gemm_flops = 2.0 * rows * kHidden * double(kVocab);

  std::printf("rows %d, hidden %d, vocab %d; mean of %d calls\n", rows, kHidden, kVocab, iterations);
  {
    // The yardstick: the whole logits in one GEMM, fp32 out (3.3 GB at 4096 rows).
    cuda::DeviceBuffer<float> logits(size_t(rows) * kVocab, "whole logits");
    const double ms = test::mean_ms(
        [&] {
          cuda::linear_forward(blas, logits.data(), hidden.data(), w.data(), nullptr, rows, kHidden, kVocab, false);
        },
        iterations);
    std::printf("one cuBLAS GEMM of the whole logits: %8.2f ms  %6.1f TFLOP/s\n", ms, tflops(gemm_flops, ms));
  }
  std::printf("%9s %12s | %10s %8s %9s | %11s %8s | %10s %8s\n", "workspace", "block", "forward ms", "TFLOP/s",
              "GEMMs ms", "backward ms", "TFLOP/s", "total ms", "TFLOP/s");
  for (size_t mib : workspaces_mib) {
    cuda::LmHeadLogprobs lm_head(rows, kHidden, kVocab, mib << 20);
    const int block_rows = lm_head.rows_per_block(), chunk = lm_head.vocab_per_block();
    // The forward's logits GEMMs alone, block by block as it runs them: what the folds add.
    cuda::DeviceBuffer<float> block(size_t(block_rows) * chunk, "logits block");
    const auto gemms = [&] {
      for (int r0 = 0; r0 < rows; r0 += block_rows) {
        for (int v0 = 0; v0 < kVocab; v0 += chunk) {
          cuda::linear_forward(blas, block.data(), hidden.data() + int64_t(r0) * kHidden,
                               w.data() + int64_t(v0) * kHidden, nullptr, std::min(block_rows, rows - r0), kHidden,
                               std::min(chunk, kVocab - v0), false);
        }
      }
    };
    const auto forward = [&] {
      lm_head.forward(blas, logp.data(), lse.data(), entropy.data(), hidden.data(), w.data(), targets_d.data(), rows);
    };
    const auto backward = [&] {
      lm_head.backward(blas, dhidden.data(), dlogp.data(), hidden.data(), w.data(), targets_d.data(), lse.data(), rows);
    };
    const double forward_ms = test::mean_ms(forward, iterations);
    const double gemms_ms = test::mean_ms(gemms, iterations);
    const double backward_ms = test::mean_ms(backward, iterations);
    const double total_ms = forward_ms + backward_ms;
    std::printf("%5zu MiB %5d x %5d | %10.2f %8.1f %9.2f | %11.2f %8.1f | %10.2f %8.1f\n", mib, block_rows, chunk,
                forward_ms, tflops(gemm_flops, forward_ms), gemms_ms, backward_ms, tflops(2 * gemm_flops, backward_ms),
                total_ms, tflops(3 * gemm_flops, total_ms));
  }
  // A finite log-prob says the timed calls computed something.
  const std::vector<float> first = logp.download(1);
  std::printf("logp[0] = %.4f\n", double(first[0]));
}

}  // namespace
}  // namespace ossrl

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  const int rows = argc > 2 ? std::max(1, std::atoi(argv[2])) : 4096;
  std::vector<size_t> workspaces;
  for (int i = 3; i < argc; ++i) workspaces.push_back(size_t(std::max(1, std::atoi(argv[i]))));
  if (workspaces.empty()) workspaces = {256, 1024, 2048};
  return ossrl::test::bench_main("logprobs_bench", [&] { ossrl::bench(iterations, rows, workspaces); });
}
