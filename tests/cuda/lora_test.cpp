// LoRA on a dense projection (cuda/lora.h) against the CPU oracle (model/cpu/lora.h, fp32) fed
// the same bf16-rounded x, A, B and dy, over odd row counts, ranks 4 and 16, and outputs that
// are a column range of a wider array (the q, k, v ranges of the fused qkv output), forward and
// backward; and both captured in a CUDA graph.
//
// Tolerance. The GPU rounds u = x · Aᵀ and v = scale · dy · B to bf16 (relative error at most
// 2^-8) and sums in another order in fp32. Each output is therefore held, element by element,
// to the error those roundings can carry through its own sum: for y, scale · Σ_j |B[o,j]| ·
// (1.5 · 2^-8 |u[t,j]| + 2^-20 Σ_i |x[t,i] A[j,i]|), plus 2^-20 of the sum of its terms' sizes
// and 2^-22 of its value (fp32 order). That is about 1-2 % of a typical |update|; a wrong
// transpose, stride, scale or a dropped accumulation is off by the size of the update.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include "cuda/lora.h"
#include "gpu_test.h"
#include "model/cpu/lora.h"

namespace ossrl {
namespace {

using test::bf16_ptr;
using test::from_device_bf16;
using test::round_bf16;
using test::to_device_bf16;
using test::uniform_vector;

constexpr double kBf16 = 1.5 / 256;    // 1.5 x the largest relative rounding error of bf16
constexpr double kOrder = 1.0 / (1 << 20);  // fp32 summation order, relative to Σ |terms|
constexpr double kAdd = 1.0 / (1 << 22);    // the fp32 add into an existing value

struct LoraCase {
  int n, r, in, out;
  int ld;      // row stride of y and dy
  int column;  // the adapter's first column in y and dy
};

std::string name(const LoraCase& c) {
  return "n" + std::to_string(c.n) + "_r" + std::to_string(c.r) + "_in" + std::to_string(c.in) + "_out" +
         std::to_string(c.out) + (c.ld != c.out ? "_ld" + std::to_string(c.ld) : "");
}
void PrintTo(const LoraCase& c, std::ostream* os) { *os << name(c); }

// c[i, j] = Σ_l a(i, l) · b(l, j) in double, c [rows, cols]: the references' error bounds.
std::vector<double> product(int rows, int cols, int inner, const std::function<double(int, int)>& a,
                            const std::function<double(int, int)>& b) {
  std::vector<double> c(size_t(rows) * size_t(cols), 0.0);
  for (int i = 0; i < rows; ++i) {
    for (int l = 0; l < inner; ++l) {
      const double ail = a(i, l);
      if (ail == 0.0) continue;
      for (int j = 0; j < cols; ++j) c[size_t(i) * cols + j] += ail * b(l, j);
    }
  }
  return c;
}

// got[i] against want[i] within bound[i], with the first failure and the worst error relative
// to its bound reported.
void expect_within(const std::vector<float>& got, const std::vector<float>& want, const std::vector<double>& bound,
                   int cols, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(double(got[i]) - double(want[i]));
    worst = std::max(worst, err / bound[i]);
    ASSERT_LE(err, bound[i]) << what << " [" << i / size_t(cols) << ", " << i % size_t(cols) << "]: gpu " << got[i]
                             << " cpu " << want[i] << ", |error| " << err << " above its bound " << bound[i];
  }
  std::printf("  %-28s worst |error| / bound %.3f\n", what.c_str(), worst);
}

// The adapter on both sides: CPU views of bf16-rounded fp32 A and B, and the device copies.
struct Adapter {
  std::vector<float> a, b;  // [r, in], [out, r]
  cuda::DeviceBuffer<float> d_a, d_b, d_grad_a, d_grad_b;
  cuda::DeviceBuffer<uint16_t> d_a16, d_b16;
  cuda::DeviceAdapter view;

  Adapter(int r, int in, int out, float scale, uint64_t seed)
      : a(round_bf16(uniform_vector(size_t(r) * in, 1.0f / std::sqrt(float(in)), seed))),
        b(round_bf16(uniform_vector(size_t(out) * r, 0.5f, seed + 1))),
        d_a(a),
        d_b(b),
        d_grad_a(uniform_vector(a.size(), 1.0f, seed + 2)),
        d_grad_b(uniform_vector(b.size(), 1.0f, seed + 3)),
        d_a16(to_device_bf16(a)),
        d_b16(to_device_bf16(b)) {
    view.experts = 1;
    view.r = r;
    view.in = in;
    view.out = out;
    view.scale = scale;
    view.a = d_a.data();
    view.b = d_b.data();
    view.grad_a = d_grad_a.data();
    view.grad_b = d_grad_b.data();
    view.a16 = reinterpret_cast<__nv_bfloat16*>(d_a16.data());
    view.b16 = reinterpret_cast<__nv_bfloat16*>(d_b16.data());
  }
  LowRankAdapter cpu(std::vector<float>* grad_a, std::vector<float>* grad_b) const {
    LowRankAdapter ad;
    ad.a = a.data();
    ad.b = b.data();
    ad.grad_a = grad_a->data();
    ad.grad_b = grad_b->data();
    ad.r = view.r;
    ad.in = view.in;
    ad.out = view.out;
    ad.scale = view.scale;
    return ad;
  }
};

class CudaLora : public ::testing::TestWithParam<LoraCase> {};

TEST_P(CudaLora, ForwardAndBackwardMatchCpu) {
  OSSRL_REQUIRE_GPU();
  const LoraCase& c = GetParam();
  const int n = c.n, r = c.r, in = c.in, out = c.out, ld = c.ld, col = c.column;
  const float scale = 1.75f;  // not a power of two: a scale applied twice or not at all shows
  std::printf("%s\n", name(c).c_str());
  Adapter ad(r, in, out, scale, 100 + uint64_t(n) * 7 + uint64_t(r));
  const std::vector<float> x = round_bf16(uniform_vector(size_t(n) * in, 1.0f, 1));
  const std::vector<float> y0 = uniform_vector(size_t(n) * ld, 1.0f, 2);
  const std::vector<float> dy_full = round_bf16(uniform_vector(size_t(n) * ld, 1.0f, 3));
  const std::vector<float> dx0 = uniform_vector(size_t(n) * in, 1.0f, 4);
  const std::vector<float> grad_a0 = ad.d_grad_a.download(), grad_b0 = ad.d_grad_b.download();

  cuda::Blas blas(nullptr);
  const auto d_x = to_device_bf16(x);
  const auto d_dy = to_device_bf16(dy_full);
  cuda::DeviceBuffer<float> d_y(y0), d_dx(dx0);
  cuda::DeviceBuffer<uint16_t> d_u(size_t(n) * r), d_v(size_t(n) * r);
  cuda::lora_forward(blas, d_y.data() + col, ld, bf16_ptr(d_x), n, ad.view, bf16_ptr(d_u));
  cuda::lora_backward(blas, d_dx.data(), bf16_ptr(d_dy) + col, ld, bf16_ptr(d_x), bf16_ptr(d_u), n, ad.view,
                      bf16_ptr(d_v));
  OSSRL_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> y = d_y.download(), dx = d_dx.download();
  const std::vector<float> u = from_device_bf16(d_u);
  const std::vector<float> grad_a = ad.d_grad_a.download(), grad_b = ad.d_grad_b.download();

  // The oracle, on the adapter's columns.
  std::vector<float> dy(size_t(n) * out), delta(size_t(n) * out, 0.0f);
  for (int t = 0; t < n; ++t) std::copy_n(dy_full.begin() + int64_t(t) * ld + col, out, dy.begin() + int64_t(t) * out);
  std::vector<float> ref_grad_a = grad_a0, ref_grad_b = grad_b0, ref_dx = dx0;
  const LowRankAdapter cpu = ad.cpu(&ref_grad_a, &ref_grad_b);
  lora_forward(delta.data(), x.data(), nullptr, n, cpu);
  lora_backward(ref_dx.data(), dy.data(), x.data(), nullptr, n, cpu);

  // Exact u = x · Aᵀ and v = scale · dy · B with the sizes of their terms.
  auto X = [&](int t, int i) { return double(x[size_t(t) * in + i]); };
  auto A = [&](int j, int i) { return double(ad.a[size_t(j) * in + i]); };
  auto B = [&](int o, int j) { return double(ad.b[size_t(o) * r + j]); };
  auto DY = [&](int t, int o) { return double(dy[size_t(t) * out + o]); };
  const std::vector<double> u_exact = product(n, r, in, X, [&](int i, int j) { return A(j, i); });
  const std::vector<double> u_terms =
      product(n, r, in, [&](int t, int i) { return std::abs(X(t, i)); }, [&](int i, int j) { return std::abs(A(j, i)); });
  const std::vector<double> v_exact = product(n, r, out, [&](int t, int o) { return scale * DY(t, o); }, B);
  const std::vector<double> v_terms = product(
      n, r, out, [&](int t, int o) { return scale * std::abs(DY(t, o)); }, [&](int o, int j) { return std::abs(B(o, j)); });
  // How far the GPU's bf16 u and v may be from the exact ones.
  std::vector<double> u_err(u_exact.size()), v_err(v_exact.size());
  for (size_t i = 0; i < u_err.size(); ++i) u_err[i] = kBf16 * std::abs(u_exact[i]) + kOrder * u_terms[i];
  for (size_t i = 0; i < v_err.size(); ++i) v_err[i] = kBf16 * std::abs(v_exact[i]) + kOrder * v_terms[i];
  auto U = [&](const std::vector<double>& m) { return [&m, r](int t, int j) { return m[size_t(t) * r + j]; }; };
  auto absU = [&](int t, int j) { return std::abs(u_exact[size_t(t) * r + j]); };
  auto absV = [&](int t, int j) { return std::abs(v_exact[size_t(t) * r + j]); };
  auto absB = [&](int j, int o) { return std::abs(B(o, j)); };

  // u.
  std::vector<double> u_bound(u_err);
  expect_within(u, std::vector<float>(u_exact.begin(), u_exact.end()), u_bound, r, "u = x · Aᵀ");

  // y: the adapter's columns against y0 + delta, every other column untouched.
  {
    const std::vector<double> carried = product(n, out, r, U(u_err), absB);
    const std::vector<double> terms = product(n, out, r, absU, absB);
    std::vector<float> got(size_t(n) * out), want(size_t(n) * out);
    std::vector<double> bound(got.size());
    for (int t = 0; t < n; ++t) {
      for (int o = 0; o < ld; ++o) {
        const size_t full = size_t(t) * ld + o;
        if (o < col || o >= col + out) {
          ASSERT_EQ(y[full], y0[full]) << "y [" << t << ", " << o << "] outside the adapter's columns was written";
          continue;
        }
        const size_t i = size_t(t) * out + (o - col);
        got[i] = y[full];
        want[i] = y0[full] + delta[i];
        bound[i] = scale * (carried[i] + kOrder * terms[i]) + kAdd * std::abs(want[i]);
      }
    }
    expect_within(got, want, bound, out, "y += scale · u · Bᵀ");
  }
  // grad_b [out, r] += scale · dyᵀ · u.
  {
    auto dyT = [&](int o, int t) { return scale * std::abs(DY(t, o)); };
    const std::vector<double> carried = product(out, r, n, dyT, U(u_err));
    const std::vector<double> terms = product(out, r, n, dyT, absU);
    std::vector<double> bound(grad_b.size());
    for (size_t i = 0; i < bound.size(); ++i) bound[i] = carried[i] + kOrder * terms[i] + kAdd * std::abs(ref_grad_b[i]);
    expect_within(grad_b, ref_grad_b, bound, r, "grad_b");
  }
  // grad_a [r, in] += vᵀ · x.
  {
    auto absXt = [&](int t, int i) { return std::abs(X(t, i)); };
    const std::vector<double> carried =
        product(r, in, n, [&](int j, int t) { return v_err[size_t(t) * r + j]; }, absXt);
    const std::vector<double> terms = product(r, in, n, [&](int j, int t) { return absV(t, j); }, absXt);
    std::vector<double> bound(grad_a.size());
    for (size_t i = 0; i < bound.size(); ++i) bound[i] = carried[i] + kOrder * terms[i] + kAdd * std::abs(ref_grad_a[i]);
    expect_within(grad_a, ref_grad_a, bound, in, "grad_a");
  }
  // dx [n, in] += v · A.
  {
    auto absA = [&](int j, int i) { return std::abs(A(j, i)); };
    const std::vector<double> carried = product(n, in, r, U(v_err), absA);
    const std::vector<double> terms = product(n, in, r, absV, absA);
    std::vector<double> bound(dx.size());
    for (size_t i = 0; i < bound.size(); ++i) bound[i] = carried[i] + kOrder * terms[i] + kAdd * std::abs(ref_dx[i]);
    expect_within(dx, ref_dx, bound, in, "dx");
  }
}

std::vector<LoraCase> cases() {
  std::vector<LoraCase> v;
  for (int n : {1, 127, 129, 1000}) {
    for (int r : {4, 16}) {
      v.push_back({n, r, 96, 80, 80, 0});    // y is exactly the adapter's output
      v.push_back({n, r, 160, 48, 176, 64});  // a middle column range of a wider y (k of qkv)
    }
  }
  // gpt-oss-20b's v_proj inside the fused qkv output: columns 4608..5119 of 5120.
  v.push_back({129, 16, 2880, 512, 5120, 4608});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLora, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<LoraCase>& info) { return name(info.param); });

// The engine captures decode steps in CUDA graphs: forward and backward must capture (no
// allocation, no sync) and replay to what the eager calls give.
TEST(CudaLoraGraph, ForwardAndBackwardCaptureAndReplay) {
  OSSRL_REQUIRE_GPU();
  const int n = 9, r = 8, in = 64, out = 48;
  Adapter ad(r, in, out, 2.0f, 7);
  const std::vector<float> x = round_bf16(uniform_vector(size_t(n) * in, 1.0f, 8));
  const std::vector<float> dy = round_bf16(uniform_vector(size_t(n) * out, 1.0f, 9));
  const std::vector<float> grad_a0 = ad.d_grad_a.download(), grad_b0 = ad.d_grad_b.download();
  const auto d_x = to_device_bf16(x);
  const auto d_dy = to_device_bf16(dy);
  cuda::DeviceBuffer<float> d_y(size_t(n) * out), d_dx(size_t(n) * in);
  cuda::DeviceBuffer<uint16_t> d_u(size_t(n) * r), d_v(size_t(n) * r);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  cuda::Blas blas(stream);

  // Zeroes the outputs and grads (outside the graph), so each run computes the same thing.
  auto reset = [&] {
    OSSRL_CUDA_CHECK(cudaMemsetAsync(d_y.data(), 0, d_y.bytes(), stream));
    OSSRL_CUDA_CHECK(cudaMemsetAsync(d_dx.data(), 0, d_dx.bytes(), stream));
    ad.d_grad_a.upload(grad_a0, stream);
    ad.d_grad_b.upload(grad_b0, stream);
  };
  auto step = [&] {
    cuda::lora_forward(blas, d_y.data(), out, bf16_ptr(d_x), n, ad.view, bf16_ptr(d_u));
    cuda::lora_backward(blas, d_dx.data(), bf16_ptr(d_dy), out, bf16_ptr(d_x), bf16_ptr(d_u), n, ad.view,
                        bf16_ptr(d_v));
  };
  auto results = [&] {
    OSSRL_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<float> all = d_y.download();
    for (const std::vector<float>& part : {d_dx.download(), ad.d_grad_a.download(), ad.d_grad_b.download()}) {
      all.insert(all.end(), part.begin(), part.end());
    }
    return all;
  };
  reset();
  step();
  const std::vector<float> eager = results();

  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  step();
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int replay = 0; replay < 2; ++replay) {
    reset();
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    const std::vector<float> replayed = results();
    ASSERT_EQ(replayed.size(), eager.size());
    for (size_t i = 0; i < eager.size(); ++i) {
      ASSERT_NEAR(replayed[i], eager[i], 1e-5 * (1.0 + std::abs(eager[i])))
          << "replay " << replay << ": value " << i << " of y | dx | grad_a | grad_b differs from the eager call";
    }
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace ossrl
