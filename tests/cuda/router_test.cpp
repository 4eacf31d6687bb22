// The fused MoE routing of small steps (cuda::moe_route_fused) against the four launches it
// replaces: rmsnorm_forward, the router linear_forward, router_topk_forward and
// moe_group_by_expert. Inputs keep the top logits apart, so a different summation order
// cannot change the choice.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include "cuda/gpu_test.h"
#include "cuda/linear.h"
#include "cuda/rmsnorm.h"
#include "cuda/router.h"

namespace ossrl {
namespace {

using cuda::DeviceBuffer;
using test::round_bf16;
using test::to_device_bf16;

constexpr int kK = 4;  // gpt-oss's experts_per_token
constexpr float kEps = 1e-5f;
// Top logits (+ bias) at least this far apart: summation order moves them by ~1e-6.
constexpr double kLogitGap = 1e-3;

__nv_bfloat16* bf16(DeviceBuffer<uint16_t>& buffer) { return reinterpret_cast<__nv_bfloat16*>(buffer.data()); }

// One step's routing inputs: residual rows x [n, hidden] of mixed scales, norm weight near 1,
// bf16 router [experts, hidden] (logits ~N(0, 1)) and bias.
struct RoutingInputs {
  int n, hidden, experts;
  std::vector<float> x, norm_weight, router, bias;
};

// The bf16 normed row and its logits + bias, in double: close enough to the GPU's to tell
// whether the top k + 1 are kLogitGap apart.
std::vector<double> host_logits(const RoutingInputs& in, int t) {
  const float* x = in.x.data() + int64_t(t) * in.hidden;
  double sum_sq = 0.0;
  for (int j = 0; j < in.hidden; ++j) sum_sq += double(x[j]) * x[j];
  const float rstd = float(1.0 / std::sqrt(sum_sq / in.hidden + kEps));
  std::vector<float> y(size_t(in.hidden));
  for (int j = 0; j < in.hidden; ++j) y[size_t(j)] = in.norm_weight[size_t(j)] * (x[j] * rstd);
  y = round_bf16(y);
  std::vector<double> logits(size_t(in.experts));
  for (int e = 0; e < in.experts; ++e) {
    double dot = in.bias[size_t(e)];
    for (int j = 0; j < in.hidden; ++j) dot += double(y[size_t(j)]) * in.router[size_t(e) * in.hidden + j];
    logits[size_t(e)] = dot;
  }
  return logits;
}

bool well_separated(std::vector<double> logits) {
  std::sort(logits.begin(), logits.end(), std::greater<>());
  for (int i = 0; i < kK; ++i) {
    if (logits[size_t(i)] - logits[size_t(i) + 1] < kLogitGap) return false;
  }
  return true;
}

RoutingInputs routing_inputs(int n, int hidden, int experts, uint64_t seed) {
  RoutingInputs in{n, hidden, experts, {}, {}, {}, {}};
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  in.norm_weight.resize(size_t(hidden));
  for (float& w : in.norm_weight) w = 1.0f + 0.3f * normal(rng);
  in.router.resize(size_t(experts) * hidden);
  for (float& w : in.router) w = normal(rng) / std::sqrt(float(hidden));
  in.router = round_bf16(in.router);
  in.bias.resize(size_t(experts));
  for (float& b : in.bias) b = 0.5f * normal(rng);
  in.x.resize(size_t(n) * hidden);
  for (int t = 0; t < n; ++t) {
    float* row = in.x.data() + int64_t(t) * hidden;
    const float scale = 0.1f + float(t % 7);
    do {  // redraw the row until its top logits are apart
      for (int j = 0; j < hidden; ++j) row[j] = scale * normal(rng);
    } while (!well_separated(host_logits(in, t)));
  }
  return in;
}

// A step's routing outputs on the device.
struct Routing {
  DeviceBuffer<uint16_t> normed;
  DeviceBuffer<float> logits, weight;
  DeviceBuffer<int32_t> index, offsets, sorted;
  Routing(int n, int hidden, int experts)
      : normed(size_t(n) * hidden), logits(size_t(n) * experts), weight(size_t(n) * kK), index(size_t(n) * kK),
        offsets(size_t(experts) + 1), sorted(size_t(n) * kK) {}
  // Poisons every output (all bits set: NaN, -1), so stale results cannot pass for new ones.
  void poison(cudaStream_t stream) {
    OSSRL_CUDA_CHECK(cudaMemsetAsync(normed.data(), 0xff, normed.bytes(), stream));
    OSSRL_CUDA_CHECK(cudaMemsetAsync(logits.data(), 0xff, logits.bytes(), stream));
    OSSRL_CUDA_CHECK(cudaMemsetAsync(weight.data(), 0xff, weight.bytes(), stream));
    OSSRL_CUDA_CHECK(cudaMemsetAsync(index.data(), 0xff, index.bytes(), stream));
    OSSRL_CUDA_CHECK(cudaMemsetAsync(offsets.data(), 0xff, offsets.bytes(), stream));
    OSSRL_CUDA_CHECK(cudaMemsetAsync(sorted.data(), 0xff, sorted.bytes(), stream));
  }
};

struct DeviceInputs {
  int n, hidden, experts;
  DeviceBuffer<float> x, norm_weight, bias;
  DeviceBuffer<uint16_t> router;
  explicit DeviceInputs(const RoutingInputs& in)
      : n(in.n), hidden(in.hidden), experts(in.experts), x(in.x), norm_weight(in.norm_weight), bias(in.bias),
        router(to_device_bf16(in.router)) {}

  void unfused(cuda::Blas& blas, Routing& out) {
    cuda::rmsnorm_forward(bf16(out.normed), x.data(), norm_weight.data(), nullptr, n, hidden, kEps, blas.stream());
    cuda::linear_forward(blas, out.logits.data(), bf16(out.normed), bf16(router), nullptr, n, hidden, experts, false);
    cuda::router_topk_forward(out.index.data(), out.weight.data(), out.logits.data(), bias.data(), n, experts, kK,
                              blas.stream());
    cuda::moe_group_by_expert(out.offsets.data(), out.sorted.data(), out.index.data(), n, kK, experts,
                              blas.stream());
  }
  void fused(Routing& out, cudaStream_t stream) {
    cuda::moe_route_fused(bf16(out.normed), out.logits.data(), out.index.data(), out.weight.data(),
                          out.offsets.data(), out.sorted.data(), x.data(), norm_weight.data(),
                          bf16(router), bias.data(), n, hidden, experts, kK, kEps, stream);
  }
};

// "name: N of M differ, first at [i]: got G, want W" when got and want differ beyond tolerance.
template <class T>
void expect_match(const std::vector<T>& got, const std::vector<T>& want, double tolerance, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, first = 0;
  double max_error = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double error = std::abs(double(got[i]) - double(want[i]));
    max_error = std::max(max_error, error);
    if (error <= tolerance) continue;  // NaN fails here too
    if (bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " differ beyond " << tolerance
                     << ", first at [" << first << "]: got " << got[first] << ", want " << want[first]
                     << "; max abs error " << max_error;
}

void expect_same_routing(const Routing& got, const Routing& want, const std::string& what) {
  // Bit for bit: the MoE kernels read these rows.
  expect_match(got.normed.download(), want.normed.download(), 0.0, what + ": normed rows (bf16 bits)");
  // fp32 sums of bf16 products in another order: ~1e-6 at logits ~1.
  expect_match(got.logits.download(), want.logits.download(), 1e-4, what + ": logits");
  expect_match(got.index.download(), want.index.download(), 0.0, what + ": expert_index");
  expect_match(got.weight.download(), want.weight.download(), 1e-5, what + ": expert_weight");
  expect_match(got.offsets.download(), want.offsets.download(), 0.0, what + ": expert_offsets");
  expect_match(got.sorted.download(), want.sorted.download(), 0.0, what + ": sorted_assignments");
}

std::string shape_name(int n, int hidden, int experts) {
  return "n " + std::to_string(n) + ", hidden " + std::to_string(hidden) + ", experts " + std::to_string(experts);
}

TEST(CudaRouter, FusedRoutingMatchesUnfusedLaunches) {
  OSSRL_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  // 64, 512, 2880: rmsnorm_forward's CTAs of 32, 128 and 256 threads.
  for (int hidden : {64, 512, 2880}) {
    EXPECT_FALSE(cuda::moe_route_fusable(1, hidden, cuda::kMoeRouteMaxExperts + 1, kK));
    for (int experts : {6, 30, cuda::kMoeRouteMaxExperts}) {  // 6, 30: a last CTA with fewer experts
      EXPECT_FALSE(cuda::moe_route_fusable(cuda::kMoeRouteMaxTokens + 1, hidden, experts, kK));
      for (int n : {1, 3, cuda::kMoeRouteMaxTokens}) {
        const std::string shape = shape_name(n, hidden, experts);
        ASSERT_TRUE(cuda::moe_route_fusable(n, hidden, experts, kK)) << shape;
        DeviceInputs in(routing_inputs(n, hidden, experts, uint64_t(n) * 1000 + hidden + experts));
        Routing want(n, hidden, experts), got(n, hidden, experts);
        in.unfused(blas, want);
        // Twice, poisoned between: nothing of the first call may be needed by the second.
        for (int call = 0; call < 2; ++call) {
          got.poison(nullptr);
          in.fused(got, nullptr);
          expect_same_routing(got, want, shape + ", call " + std::to_string(call));
        }
      }
    }
  }
}

TEST(CudaRouter, FusedRoutingReplaysInAGraph) {
  OSSRL_REQUIRE_GPU();
  cudaStream_t stream = nullptr;
  OSSRL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cuda::Blas blas(stream);
  for (int n : {1, cuda::kMoeRouteMaxTokens}) {
    const std::string shape = shape_name(n, 2880, 32);
    DeviceInputs in(routing_inputs(n, 2880, 32, 77 + n));
    Routing want(n, 2880, 32), got(n, 2880, 32);
    in.unfused(blas, want);
    cudaGraph_t graph = nullptr;
    OSSRL_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    in.fused(got, stream);
    OSSRL_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec = nullptr;
    OSSRL_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 3; ++replay) {
      got.poison(stream);
      OSSRL_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      OSSRL_CUDA_CHECK(cudaStreamSynchronize(stream));
      expect_same_routing(got, want, shape + ", replay " + std::to_string(replay));
    }
    OSSRL_CUDA_CHECK(cudaGraphExecDestroy(exec));
    OSSRL_CUDA_CHECK(cudaGraphDestroy(graph));
  }
  OSSRL_CUDA_CHECK(cudaStreamDestroy(stream));
}

// Not a check: GPU time per routing, fused and unfused, at gpt-oss's shapes, each captured
// 50 times in a graph (as decode runs) and replayed.
TEST(CudaRouter, FusedRoutingTiming) {
  OSSRL_REQUIRE_GPU();
  cudaStream_t stream = nullptr;
  OSSRL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cuda::Blas blas(stream);
  cudaEvent_t start = nullptr, stop = nullptr;
  OSSRL_CUDA_CHECK(cudaEventCreate(&start));
  OSSRL_CUDA_CHECK(cudaEventCreate(&stop));
  constexpr int kRepeats = 50;
  constexpr int experts = cuda::kMoeRouteMaxExperts;
  for (int n = 1; n <= cuda::kMoeRouteMaxTokens; ++n) {
    DeviceInputs in(routing_inputs(n, 2880, experts, 5 + n));
    Routing out(n, 2880, experts);
    auto time_us = [&](auto&& route) {
      cudaGraph_t graph = nullptr;
      OSSRL_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      for (int r = 0; r < kRepeats; ++r) route();
      OSSRL_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      cudaGraphExec_t exec = nullptr;
      OSSRL_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      OSSRL_CUDA_CHECK(cudaGraphLaunch(exec, stream));  // warm-up
      OSSRL_CUDA_CHECK(cudaEventRecord(start, stream));
      OSSRL_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      OSSRL_CUDA_CHECK(cudaEventRecord(stop, stream));
      OSSRL_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      OSSRL_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      OSSRL_CUDA_CHECK(cudaGraphExecDestroy(exec));
      OSSRL_CUDA_CHECK(cudaGraphDestroy(graph));
      return 1000.0 * ms / kRepeats;
    };
    const double unfused = time_us([&] { in.unfused(blas, out); });
    const double fused = time_us([&] { in.fused(out, stream); });
    std::printf("routing %s: unfused %.1f us, fused %.1f us\n", shape_name(n, 2880, experts).c_str(), unfused,
                fused);
  }
  OSSRL_CUDA_CHECK(cudaEventDestroy(start));
  OSSRL_CUDA_CHECK(cudaEventDestroy(stop));
  OSSRL_CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace
}  // namespace ossrl
