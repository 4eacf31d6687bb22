// Times the MoE training block (cuda/moe_train.h) at gpt-oss-20b's shape (hidden 2880,
// intermediate 2880, 32 experts, top-4) on random weights (cuda/random_init.h): forward (with
// the activations kept) and backward per layer, MXFP4 and bf16 experts, with and without LoRA
// on both expert projections, and TFLOP/s of the expert matmuls (base + LoRA). Backward is timed
// by repeating the backward of one forward (it reads only what forward kept). Then the same with
// the activations kept in a MoeTrainActivations of their own ("kept": forward keep + backward
// from kept), and a layer's MoE cost per training step both ways: recomputing (forward, then
// forward + backward in the backward pass) or keeping (forward keep + backward from kept).
// Usage: moe_train_bench [iterations [tokens...]]   (default: 10, 4096)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/buffer.h"
#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/lora.h"
#include "cuda/moe_train.h"
#include "cuda/random_init.h"
#include "gpu_bench.h"

namespace ossrl {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kHidden = 2880, kIntermediate = 2880, kExperts = 32, kTopK = 4;

// One projection's experts, MXFP4 (as the checkpoint) or bf16 (dequantised), weights of std 0.02.
struct Projection {
  cuda::DeviceBuffer<uint8_t> blocks, scales;
  cuda::DeviceBuffer<bf16> dense;
  cuda::DeviceBuffer<float> bias;
  cuda::ExpertWeights view;

  Projection(bool mxfp4, int out, int in, uint64_t seed) {
    const size_t values = size_t(kExperts) * out * in;
    if (mxfp4) {
      blocks = cuda::DeviceBuffer<uint8_t>(values / 2, "blocks");
      scales = cuda::DeviceBuffer<uint8_t>(values / 32, "scales");
      cuda::random_mxfp4(blocks.data(), scales.data(), values / 32, 0.02f, seed, nullptr);
    } else {
      dense = cuda::DeviceBuffer<bf16>(values, "dense");
      cuda::random_uniform_bf16(dense.data(), values, 0.0f, 0.02f, seed, nullptr);
    }
    bias = cuda::DeviceBuffer<float>(size_t(kExperts) * out, "bias");
    cuda::random_uniform_f32(bias.data(), bias.size(), 0.0f, 0.01f, seed + 1, nullptr);
    view.mxfp4 = mxfp4;
    view.blocks = blocks.data();
    view.scales = scales.data();
    view.dense = dense.data();
    view.bias = bias.data();
    view.experts = kExperts;
    view.out = out;
    view.in = in;
  }
};

// Per-expert adapters with random A and B (B nonzero, as after some training).
struct Adapter {
  cuda::DeviceBuffer<float> a, b, grad_a, grad_b;
  cuda::DeviceBuffer<bf16> a16, b16;
  cuda::DeviceAdapter view;

  Adapter(int r, int in, int out, uint64_t seed)
      : a(size_t(kExperts) * r * in), b(size_t(kExperts) * out * r), grad_a(a.size()), grad_b(b.size()),
        a16(a.size()), b16(b.size()) {
    cuda::random_uniform_f32(a.data(), a.size(), 0.0f, 0.02f, seed, nullptr);
    cuda::random_uniform_f32(b.data(), b.size(), 0.0f, 0.02f, seed + 1, nullptr);
    cuda::random_uniform_bf16(a16.data(), a.size(), 0.0f, 0.02f, seed, nullptr);
    cuda::random_uniform_bf16(b16.data(), b.size(), 0.0f, 0.02f, seed + 1, nullptr);
    OSSRL_CUDA_CHECK(cudaMemset(grad_a.data(), 0, grad_a.bytes()));
    OSSRL_CUDA_CHECK(cudaMemset(grad_b.data(), 0, grad_b.bytes()));
    view = {kExperts, r, in, out, 2.0f, a.data(), b.data(), grad_a.data(), grad_b.data(), a16.data(), b16.data()};
  }
};

void bench(bool mxfp4, int r, int tokens, int iterations) {
  const Projection gate_up(mxfp4, 2 * kIntermediate, kHidden, 11), down(mxfp4, kHidden, kIntermediate, 12);
  cuda::DeviceBuffer<bf16> router(size_t(kExperts) * kHidden, "router");
  cuda::random_uniform_bf16(router.data(), router.size(), 0.0f, 1.0f / 54.0f, 13, nullptr);  // logits of std ~1
  cuda::DeviceBuffer<float> router_bias(kExperts, "router bias");
  cuda::random_uniform_f32(router_bias.data(), router_bias.size(), 0.0f, 0.1f, 14, nullptr);
  cuda::DeviceBuffer<bf16> xn(size_t(tokens) * kHidden, "xn");
  cuda::random_uniform_bf16(xn.data(), xn.size(), 0.0f, 1.0f, 15, nullptr);
  cuda::DeviceBuffer<float> residual(size_t(tokens) * kHidden, "residual"), dout(residual.size(), "dout"),
      dxn(residual.size(), "dxn");
  OSSRL_CUDA_CHECK(cudaMemset(residual.data(), 0, residual.bytes()));
  cuda::random_uniform_f32(dout.data(), dout.size(), 0.0f, 1e-3f, 16, nullptr);
  std::vector<Adapter> adapters;
  adapters.reserve(2);
  const cuda::DeviceAdapter* gate_up_ad = nullptr;
  const cuda::DeviceAdapter* down_ad = nullptr;
  if (r > 0) {
    gate_up_ad = &adapters.emplace_back(r, kHidden, 2 * kIntermediate, 17).view;
    down_ad = &adapters.emplace_back(r, kIntermediate, kHidden, 19).view;
  }
  const cuda::MoeTrainWeights w{router.data(), router_bias.data(), gate_up.view, down.view};
  cuda::MoeTrainDims dims{kHidden, kIntermediate, kExperts, kTopK, 7.0f, r};
  if (!mxfp4) dims.mxfp4_stage_bytes = 0;
  cuda::Blas blas(nullptr);
  cuda::MoeTrainBlock block(dims, tokens);
  OSSRL_CUDA_CHECK(cudaDeviceSynchronize());

  const double fwd = test::mean_ms(
      [&] { block.forward(blas, residual.data(), xn.data(), tokens, w, gate_up_ad, down_ad); }, iterations);
  const double bwd = test::mean_ms(
      [&] { block.backward(blas, dxn.data(), dout.data(), xn.data(), tokens, w, gate_up_ad, down_ad); }, iterations);
  cuda::MoeTrainActivations kept(dims, tokens);
  const double fwd_keep = test::mean_ms(
      [&] { block.forward(blas, residual.data(), xn.data(), tokens, w, gate_up_ad, down_ad, &kept); }, iterations);
  const double bwd_kept = test::mean_ms(
      [&] { block.backward(blas, dxn.data(), dout.data(), xn.data(), tokens, w, gate_up_ad, down_ad, &kept); },
      iterations);
  OSSRL_CUDA_CHECK(cudaDeviceSynchronize());

  // Expert matmul flops, rows = tokens * k: forward gate_up + down, backward their two input
  // grads; LoRA: forward x·Aᵀ and u·Bᵀ per projection, backward dy·B, the two weight grads and v·A.
  const double rows = double(tokens) * kTopK;
  const double base = 2.0 * rows * (2.0 * kIntermediate * kHidden + double(kHidden) * kIntermediate);
  const double lora_per_pass = 2.0 * rows * r * ((kHidden + 2.0 * kIntermediate) + (kIntermediate + kHidden));
  const double fwd_flops = base + lora_per_pass, bwd_flops = base + 2.0 * lora_per_pass;
  std::printf("%-5s r %-3d %6d tokens | forward %7.3f ms %6.1f TFLOP/s | backward %7.3f ms %6.1f TFLOP/s | block %.2f GiB\n",
              mxfp4 ? "MXFP4" : "bf16", r, tokens, fwd, fwd_flops / fwd / 1e9, bwd, bwd_flops / bwd / 1e9,
              double(cuda::MoeTrainBlock::bytes(dims, tokens)) / double(1 << 30));
  const size_t kept_bytes = cuda::MoeTrainActivations::bytes(dims, tokens);
  std::printf("      kept: forward %7.3f ms | backward %7.3f ms | step per layer: recompute %7.3f ms, kept %7.3f ms | "
              "kept %.0f B/token, %.3f GiB\n",
              fwd_keep, bwd_kept, 2 * fwd + bwd, fwd_keep + bwd_kept, double(kept_bytes) / tokens,
              double(kept_bytes) / double(1 << 30));
}

}  // namespace
}  // namespace ossrl

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::max(1, std::atoi(argv[1])) : 10;
  std::vector<int> tokens;
  for (int i = 2; i < argc; ++i) tokens.push_back(std::max(1, std::atoi(argv[i])));
  if (tokens.empty()) tokens = {4096};
  return ossrl::test::bench_main("moe_train_bench", [&] {
    std::printf("MoE training block, hidden %d, intermediate %d, %d experts, top-%d; mean of %d calls\n",
                ossrl::kHidden, ossrl::kIntermediate, ossrl::kExperts, ossrl::kTopK, iterations);
    for (int t : tokens) {
      ossrl::bench(true, 16, t, iterations);
      ossrl::bench(true, 0, t, iterations);
      ossrl::bench(false, 16, t, iterations);
      ossrl::bench(false, 0, t, iterations);
    }
  });
}
