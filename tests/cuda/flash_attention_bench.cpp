// Times flash_attention_forward and flash_attention_backward (cuda/flash_attention.h) at
// gpt-oss-20b's attention shape (64 query heads, 8 kv heads, head_dim 64) for its two layer
// kinds (full causal and window 128), on random inputs: ms per call and achieved TFLOP/s.
// FLOPs count the (query, key) pairs the mask allows, 4 * 64 per pair and head for the forward
// (Q K^T and P V) and 2.5x that for the backward (five products), as flash attention papers
// do: the kernels' second q·k mma for q's bf16 low half is not counted.
// Usage: flash_attention_bench [iterations]   (default 10)
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
#include "cuda/flash_attention.h"
#include "gpu_bench.h"
#include "random_inputs.h"

namespace ossrl {
namespace {

constexpr int kHeads = 64, kKvHeads = 8, kHeadDim = 64;

struct BenchCase {
  int n_seqs;
  int length;
  int window;
};

// (query, key) pairs one head attends over a sequence of `length` positions.
double allowed_pairs(int length, int window) {
  double pairs = 0;
  for (int p = 0; p < length; ++p) pairs += window > 0 ? std::min(p + 1, window) : p + 1;
  return pairs;
}

void bench(const BenchCase& c, int iterations) {
  std::mt19937 rng(1);
  const size_t n = size_t(c.n_seqs) * c.length;
  std::vector<int32_t> offsets(size_t(c.n_seqs) + 1);
  for (int s = 0; s <= c.n_seqs; ++s) offsets[size_t(s)] = s * c.length;
  const std::vector<uint16_t> k_bits = test::uniform_bf16_bits(n * kKvHeads * kHeadDim, 1.0f, rng);
  const std::vector<uint16_t> v_bits = test::uniform_bf16_bits(k_bits.size(), 1.0f, rng);
  const cuda::DeviceBuffer<float> q(test::uniform_vector(n * kHeads * kHeadDim, 4.0f, rng), "q");
  const cuda::DeviceBuffer<float> dout(test::uniform_vector(n * kHeads * kHeadDim, 1.0f, rng), "dout");
  const cuda::DeviceBuffer<float> sinks(test::uniform_vector(kHeads, 2.0f, rng), "sinks");
  const cuda::DeviceBuffer<uint16_t> k(k_bits, "k"), v(v_bits, "v");
  const cuda::DeviceBuffer<int32_t> seq_offsets(offsets, "seq_offsets");
  cuda::DeviceBuffer<uint16_t> out(n * kHeads * kHeadDim, "out");
  cuda::DeviceBuffer<float> lse(n * kHeads, "lse"), scratch(n * kHeads, "scratch");
  cuda::DeviceBuffer<float> dq(n * kHeads * kHeadDim, "dq"), dk(n * kKvHeads * kHeadDim, "dk"),
      dv(n * kKvHeads * kHeadDim, "dv"), dsinks(kHeads, "dsinks");
  OSSRL_CUDA_CHECK(cudaMemset(dsinks.data(), 0, dsinks.bytes()));

  cuda::FlashAttentionShape shape;
  shape.seq_offsets = seq_offsets.data();
  shape.n_seqs = c.n_seqs;
  shape.n_tokens = int(n);
  shape.max_seq_len = c.length;
  shape.heads = kHeads;
  shape.kv_heads = kKvHeads;
  shape.head_dim = kHeadDim;
  shape.sliding_window = c.window;
  auto* out_p = reinterpret_cast<__nv_bfloat16*>(out.data());
  const auto* k_p = reinterpret_cast<const __nv_bfloat16*>(k.data());
  const auto* v_p = reinterpret_cast<const __nv_bfloat16*>(v.data());
  const double tf = 1e-3 * test::mean_ms(
      [&] { cuda::flash_attention_forward(out_p, lse.data(), q.data(), k_p, v_p, sinks.data(), shape, nullptr); },
      iterations);
  const double tb = 1e-3 * test::mean_ms(
      [&] {
        cuda::flash_attention_backward(dq.data(), dk.data(), dv.data(), dsinks.data(), scratch.data(), dout.data(),
                                       q.data(), k_p, v_p, sinks.data(), out_p, lse.data(), shape, nullptr);
      },
      iterations);
  OSSRL_CUDA_CHECK(cudaDeviceSynchronize());

  const double forward_flops = 4.0 * kHeadDim * kHeads * c.n_seqs * allowed_pairs(c.length, c.window);
  const double backward_flops = 2.5 * forward_flops;
  std::printf("%6d %7d %7d | %10.3f %8.1f | %10.3f %8.1f\n", c.n_seqs, c.length, c.window, tf * 1e3,
              forward_flops / tf / 1e12, tb * 1e3, backward_flops / tb / 1e12);
}

}  // namespace
}  // namespace ossrl

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::max(1, std::atoi(argv[1])) : 10;
  return ossrl::test::bench_main("flash_attention_bench", [&] {
    std::printf("heads %d / kv heads %d, head_dim %d; mean of %d calls\n", ossrl::kHeads, ossrl::kKvHeads,
                ossrl::kHeadDim, iterations);
    std::printf("%6s %7s %7s | %10s %8s | %10s %8s\n", "seqs", "length", "window", "forward ms", "TFLOP/s",
                "backward ms", "TFLOP/s");
    for (const ossrl::BenchCase c : {ossrl::BenchCase{4, 1024, 0}, ossrl::BenchCase{4, 1024, 128},
                                     ossrl::BenchCase{1, 16384, 0}, ossrl::BenchCase{1, 16384, 128}}) {
      ossrl::bench(c, iterations);
    }
  });
}
