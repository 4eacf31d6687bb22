// Times the MoE expert kernels (cuda/moe.h) at gpt-oss-20b's shape (hidden 2880, intermediate
// 2880, 32 experts, top-4) with random weights and random routing, from batch-1 decode to
// prefill: per call time, weight bandwidth (bytes of the experts that got rows, each read once)
// against 3.0 TB/s, and tensor throughput; then the same calls with a rank-16 adapter on every
// expert of both projections (the policy's LoRA in rollouts: u = scale · act · A_eᵀ, then the
// matmul extended by B_e), as time and as the increase over the call without it. As in the
// engine, where each layer brings new weights (and adapters), consecutive calls cycle through
// kLayers copies of them (together far larger than L2), so every call reads its weights from
// DRAM; calls run back to back on one stream.
// Usage: moe_bench [iterations [mxfp4|bf16|all [tokens...]]]   (default: 20 all, tokens 1 8 64
// 256 4096 16384)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda/buffer.h"
#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/moe.h"
#include "gpu_bench.h"
#include "random_inputs.h"

namespace ossrl {
namespace {

constexpr int kHidden = 2880, kIntermediate = 2880, kExperts = 32, kTopK = 4;
constexpr int kLayers = 4;
constexpr int kLoraRank = 16;
constexpr double kPeakBytesPerSecond = 3.0e12;

// One projection's experts on the GPU, MXFP4 (scales 118..124) or bf16 (|w| about 2^-5),
// kLayers copies of them at different addresses.
struct DeviceExperts {
  cuda::DeviceBuffer<uint8_t> blocks, scales;
  cuda::DeviceBuffer<uint16_t> dense;
  cuda::DeviceBuffer<float> bias;
  cuda::ExpertWeights layer[kLayers];
  double bytes_per_expert = 0;

  DeviceExperts(bool mxfp4, int out, int in, std::mt19937_64& rng) {
    const size_t values = size_t(kExperts) * out * in;
    if (mxfp4) {
      blocks = layered(test::random_bytes(values / 2, rng), "blocks");
      std::vector<uint8_t> s = test::random_bytes(values / 32, rng);
      for (uint8_t& v : s) v = uint8_t(118 + v % 7);
      scales = layered(s, "scales");
      bytes_per_expert = double(out) * in / 2 + double(out) * in / 32;
    } else {
      std::vector<uint8_t> raw = test::random_bytes(values * 2, rng);
      std::vector<uint16_t> bits(values);
      for (size_t i = 0; i < values; ++i) {
        // sign and 7 mantissa bits random, exponent 2^-8 .. 2^-4
        const uint16_t r = uint16_t(raw[2 * i] | raw[2 * i + 1] << 8);
        bits[i] = uint16_t((r & 0x807f) | uint16_t(119 + (r >> 7 & 0xff) % 5) << 7);
      }
      dense = layered(bits, "dense");
      bytes_per_expert = double(out) * in * 2;
    }
    bias = layered(std::vector<float>(size_t(kExperts) * out, 0.01f), "bias");
    for (int l = 0; l < kLayers; ++l) {
      cuda::ExpertWeights& w = layer[l];
      w.mxfp4 = mxfp4;
      w.blocks = mxfp4 ? blocks.data() + size_t(l) * values / 2 : nullptr;
      w.scales = mxfp4 ? scales.data() + size_t(l) * values / 32 : nullptr;
      w.dense = mxfp4 ? nullptr : reinterpret_cast<const __nv_bfloat16*>(dense.data()) + size_t(l) * values;
      w.bias = bias.data() + size_t(l) * kExperts * out;
      w.experts = kExperts;
      w.out = out;
      w.in = in;
    }
  }

  // kLayers back-to-back copies of `host` in one device buffer.
  template <class T>
  static cuda::DeviceBuffer<T> layered(const std::vector<T>& host, const char* what) {
    cuda::DeviceBuffer<T> d(host.size() * kLayers, what);
    d.upload(host);
    for (int l = 1; l < kLayers; ++l) {
      OSSRL_CUDA_CHECK(cudaMemcpy(d.data() + l * host.size(), d.data(), host.size() * sizeof(T),
                                  cudaMemcpyDeviceToDevice));
    }
    return d;
  }
};

// One projection's per-expert adapters, rank kLoraRank, bf16 A [experts, r, in] and B
// [experts, out, r] (cuda/lora.h's layout), kLayers copies; values do not matter to the time.
struct DeviceExpertAdapters {
  cuda::DeviceBuffer<uint16_t> a, b;
  cuda::DeviceAdapter layer[kLayers];

  DeviceExpertAdapters(int out, int in, std::mt19937_64& rng) {
    const size_t a_count = size_t(kExperts) * kLoraRank * in, b_count = size_t(kExperts) * out * kLoraRank;
    a = DeviceExperts::layered(test::uniform_bf16_bits(a_count, 0.02f, rng), "lora A");
    b = DeviceExperts::layered(test::uniform_bf16_bits(b_count, 0.02f, rng), "lora B");
    for (int l = 0; l < kLayers; ++l) {
      cuda::DeviceAdapter& ad = layer[l];
      ad.experts = kExperts;
      ad.r = kLoraRank;
      ad.in = in;
      ad.out = out;
      ad.scale = 2.0f;
      ad.a16 = reinterpret_cast<__nv_bfloat16*>(a.data()) + size_t(l) * a_count;
      ad.b16 = reinterpret_cast<__nv_bfloat16*>(b.data()) + size_t(l) * b_count;
    }
  }
};

// Mean seconds per call of call(layer) over `iterations` back-to-back calls cycling through
// the layers, after a warm-up pass over all of them.
template <class Call>
double time_calls(Call call, int iterations) {
  for (int l = 0; l < kLayers; ++l) call(l);  // warm-up: module load, first touch
  test::EventTimer timer;
  return 1e-3 * timer.ms([&] {
    for (int i = 0; i < iterations; ++i) call(i % kLayers);
  }) / iterations;
}

void bench(bool mxfp4, int iterations, const std::vector<int>& token_counts) {
  std::mt19937_64 rng(1);
  DeviceExperts gate_up(mxfp4, 2 * kIntermediate, kHidden, rng);
  DeviceExperts down(mxfp4, kHidden, kIntermediate, rng);
  DeviceExpertAdapters lora_gate_up(2 * kIntermediate, kHidden, rng), lora_down(kHidden, kIntermediate, rng);

  std::printf("\n%s experts, hidden %d, intermediate %d, %d experts, top-%d; mean of %d calls over %d layers\n",
              mxfp4 ? "MXFP4" : "bf16", kHidden, kIntermediate, kExperts, kTopK, iterations, kLayers);
  std::printf("%7s %7s %7s | %9s %8s %7s %8s | %9s %8s %7s %8s | %21s %21s\n", "tokens", "rows", "experts",
              "gate_up us", "GB/s", "%3TB/s", "TFLOP/s", "down us", "GB/s", "%3TB/s", "TFLOP/s",
              "gate_up+LoRA16 us", "down+LoRA16 us");
  for (int tokens : token_counts) {
    const int rows = tokens * kTopK;
    // Random top-4 routing, grouped by expert as cuda/router.h does.
    std::vector<int32_t> index(static_cast<size_t>(rows));
    std::vector<int> order(kExperts);
    for (int e = 0; e < kExperts; ++e) order[size_t(e)] = e;
    for (int t = 0; t < tokens; ++t) {
      std::shuffle(order.begin(), order.end(), rng);
      for (int s = 0; s < kTopK; ++s) index[size_t(t * kTopK + s)] = order[size_t(s)];
    }
    std::vector<int32_t> offsets(kExperts + 1, 0), sorted;
    for (int e = 0; e < kExperts; ++e) {
      for (int a = 0; a < rows; ++a) {
        if (index[size_t(a)] == e) sorted.push_back(a);
      }
      offsets[size_t(e) + 1] = int32_t(sorted.size());
    }
    int hit = 0;
    for (int e = 0; e < kExperts; ++e) hit += offsets[size_t(e) + 1] > offsets[size_t(e)];

    const cuda::DeviceBuffer<uint16_t> x(test::uniform_bf16_bits(size_t(tokens) * kHidden, 1.0f, rng), "x");
    const cuda::DeviceBuffer<int32_t> d_sorted(sorted, "sorted"), d_offsets(offsets, "offsets");
    cuda::DeviceBuffer<uint16_t> h(size_t(rows) * kIntermediate, "h");
    OSSRL_CUDA_CHECK(cudaMemset(h.data(), 0, h.bytes()));
    cuda::DeviceBuffer<float> y(size_t(rows) * kHidden, "y");
    cuda::DeviceBuffer<uint16_t> lora_u(size_t(rows) * kLoraRank, "lora u");
    auto* up = reinterpret_cast<__nv_bfloat16*>(lora_u.data());
    auto* hp = reinterpret_cast<__nv_bfloat16*>(h.data());
    const auto* xp = reinterpret_cast<const __nv_bfloat16*>(x.data());

    const double tg = time_calls(
        [&](int l) {
          cuda::moe_gate_up_swiglu(hp, xp, d_sorted.data(), d_offsets.data(), tokens, kTopK, gate_up.layer[l], 7.0f,
                                   nullptr);
        },
        iterations);
    const double td = time_calls(
        [&](int l) {
          cuda::moe_down(y.data(), hp, d_sorted.data(), d_offsets.data(), tokens, kTopK, down.layer[l], nullptr);
        },
        iterations);
    const double tg_lora = time_calls(
        [&](int l) {
          cuda::moe_gate_up_swiglu(hp, xp, d_sorted.data(), d_offsets.data(), tokens, kTopK, gate_up.layer[l], 7.0f,
                                   nullptr, &lora_gate_up.layer[l], up);
        },
        iterations);
    const double td_lora = time_calls(
        [&](int l) {
          cuda::moe_down(y.data(), hp, d_sorted.data(), d_offsets.data(), tokens, kTopK, down.layer[l], nullptr,
                         &lora_down.layer[l], up);
        },
        iterations);
    OSSRL_CUDA_CHECK(cudaDeviceSynchronize());

    auto report = [&](double seconds, const DeviceExperts& w, int out, int in) {
      const double bytes = hit * w.bytes_per_expert;
      const double flops = 2.0 * rows * out * in;
      std::printf(" %9.1f %8.0f %6.1f%% %8.1f |", seconds * 1e6, bytes / seconds / 1e9,
                  100.0 * bytes / seconds / kPeakBytesPerSecond, flops / seconds / 1e12);
    };
    std::printf("%7d %7d %7d |", tokens, rows, hit);
    report(tg, gate_up, 2 * kIntermediate, kHidden);
    report(td, down, kHidden, kIntermediate);
    std::printf(" %9.1f (%+8.1f) %9.1f (%+8.1f)\n", tg_lora * 1e6, (tg_lora - tg) * 1e6, td_lora * 1e6,
                (td_lora - td) * 1e6);
  }
}

}  // namespace
}  // namespace ossrl

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::max(1, std::atoi(argv[1])) : 20;
  const std::string formats = argc > 2 ? argv[2] : "all";
  std::vector<int> tokens;
  for (int i = 3; i < argc; ++i) tokens.push_back(std::max(1, std::atoi(argv[i])));
  if (tokens.empty()) tokens = {1, 8, 64, 256, 4096, 16384};
  return ossrl::test::bench_main("moe_bench", [&] {
    if (formats != "bf16") ossrl::bench(true, iterations, tokens);
    if (formats != "mxfp4") ossrl::bench(false, iterations, tokens);
  });
}
