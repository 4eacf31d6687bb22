// flash_attention_forward / flash_attention_backward against the CPU oracle
// (model/cpu/attention.h), sequence by sequence, over ragged batches of whole sequences:
// lengths around the 64-row tiles and the 128 window, full causal and sliding windows, GQA
// groups of 1, 2 and 8.
#include "cuda/flash_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda/gpu_test.h"
#include "model/cpu/attention.h"

namespace ossrl {
namespace {

constexpr int kHeadDim = 64;

struct FlashCase {
  int heads = 0;
  int kv_heads = 0;
  int sliding_window = 0;
  std::vector<int> lengths;  // one call over all of them, back to back
  int extra_max_len = 0;     // max_seq_len beyond the longest: the surplus tiles must do nothing
};

std::string describe(const FlashCase& c) {
  std::ostringstream s;
  s << "heads " << c.heads << "/" << c.kv_heads << " window " << c.sliding_window << " lengths {";
  for (size_t i = 0; i < c.lengths.size(); ++i) s << (i ? ", " : "") << c.lengths[i];
  s << "}";
  if (c.extra_max_len) s << " max_seq_len +" << c.extra_max_len;
  return s.str();
}

// A tensor laid out [token, heads, dims] (dims 1 for lse; tokens absent for dsinks), to name
// the worst element of a comparison.
struct Layout {
  const char* name;
  int heads;
  int dims;
  bool per_token = true;
};

// Expects max |gpu - cpu| <= tolerance * max |cpu| (a NaN anywhere fails); the message names
// the tensor, the worst element's sequence, position, head and dim, both values and the case.
void expect_close(const Layout& layout, const std::vector<float>& gpu, const std::vector<float>& cpu,
                  double tolerance, bool relative_to_max, const std::vector<int32_t>& offsets,
                  const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << layout.name;
  double max_ref = 0.0, max_err = -1.0;
  size_t worst = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    max_ref = std::max(max_ref, double(std::abs(cpu[i])));
    const double err = std::abs(double(gpu[i]) - double(cpu[i]));
    if (std::isnan(err)) {
      max_err = INFINITY;
      worst = i;
      break;
    }
    if (err > max_err) {
      max_err = err;
      worst = i;
    }
  }
  if (cpu.empty()) return;
  const double bound = relative_to_max ? tolerance * max_ref : tolerance;
  std::ostringstream where;
  const int64_t row = int64_t(worst) / layout.dims;
  if (layout.per_token) {
    const int64_t token = row / layout.heads;
    const size_t seq = size_t(std::upper_bound(offsets.begin(), offsets.end(), int32_t(token)) - offsets.begin()) - 1;
    where << "sequence " << seq << " (length " << offsets[seq + 1] - offsets[seq] << "), position "
          << token - offsets[seq] << ", head " << row % layout.heads;
  } else {
    where << "head " << row;
  }
  if (layout.dims > 1) where << ", dim " << int64_t(worst) % layout.dims;
  EXPECT_LE(max_err, bound) << layout.name << ": max |gpu - cpu| " << max_err << " > " << bound << " (max |cpu| "
                            << max_ref << ") at " << where.str() << ": gpu " << gpu[worst] << ", cpu " << cpu[worst]
                            << "; " << what;
}

// All bits set: a NaN in fp32 and bf16 alike.
template <class T>
void poison(cuda::DeviceBuffer<T>& buffer) {
  OSSRL_CUDA_CHECK(cudaMemset(buffer.data(), 0xff, buffer.bytes()));
}

void run_case(const FlashCase& c) {
  const std::string what = describe(c);
  SCOPED_TRACE(what);
  std::mt19937 rng(4321 + c.heads * 7 + c.kv_heads * 131 + c.sliding_window);
  std::vector<int32_t> offsets{0};
  int max_len = 0;
  for (int length : c.lengths) {
    offsets.push_back(offsets.back() + length);
    max_len = std::max(max_len, length);
  }
  const int n_seqs = int(c.lengths.size());
  const int64_t n = offsets.back();
  const int64_t q_row = int64_t(c.heads) * kHeadDim;
  const int64_t kv_row = int64_t(c.kv_heads) * kHeadDim;

  // Logits q·k/8 with |q| < 4, |k| < 1: standard deviation ~1.3, softmaxes neither flat nor
  // one-hot; sinks in (-2, 2) carry a visible share. k and v are bf16 on the device, so the
  // CPU sees them rounded; q and dout are read in fp32.
  const std::vector<float> q = test::uniform_vector(size_t(n * q_row), 4.0f, rng);
  const std::vector<float> k = test::round_bf16(test::uniform_vector(size_t(n * kv_row), 1.0f, rng));
  const std::vector<float> v = test::round_bf16(test::uniform_vector(size_t(n * kv_row), 1.0f, rng));
  const std::vector<float> sinks = test::uniform_vector(size_t(c.heads), 2.0f, rng);
  const std::vector<float> dout = test::uniform_vector(size_t(n * q_row), 1.0f, rng);
  const std::vector<float> dsinks_init(size_t(c.heads), 0.5f);  // dsinks accumulates

  cuda::DeviceBuffer<float> q_d(q), sinks_d(sinks), dout_d(dout), dsinks_d(dsinks_init);
  cuda::DeviceBuffer<uint16_t> k_d = test::to_device_bf16(k), v_d = test::to_device_bf16(v);
  cuda::DeviceBuffer<int32_t> offsets_d(offsets);
  cuda::DeviceBuffer<uint16_t> out_d(size_t(n * q_row));
  cuda::DeviceBuffer<float> lse_d(size_t(n * c.heads)), scratch_d(size_t(n * c.heads));
  cuda::DeviceBuffer<float> dq_d(size_t(n * q_row)), dk_d(size_t(n * kv_row)), dv_d(size_t(n * kv_row));
  // NaN everywhere the kernels must overwrite: an element left unwritten fails the comparison.
  poison(out_d);
  poison(lse_d);
  poison(dq_d);
  poison(dk_d);
  poison(dv_d);

  cuda::FlashAttentionShape shape;
  shape.seq_offsets = offsets_d.data();
  shape.n_seqs = n_seqs;
  shape.n_tokens = int(n);
  shape.max_seq_len = max_len + c.extra_max_len;
  shape.heads = c.heads;
  shape.kv_heads = c.kv_heads;
  shape.head_dim = kHeadDim;
  shape.sliding_window = c.sliding_window;
  auto* out_p = reinterpret_cast<__nv_bfloat16*>(out_d.data());
  const auto* k_p = reinterpret_cast<const __nv_bfloat16*>(k_d.data());
  const auto* v_p = reinterpret_cast<const __nv_bfloat16*>(v_d.data());
  cuda::flash_attention_forward(out_p, lse_d.data(), q_d.data(), k_p, v_p, sinks_d.data(), shape, nullptr);
  cuda::flash_attention_backward(dq_d.data(), dk_d.data(), dv_d.data(), dsinks_d.data(), scratch_d.data(),
                                 dout_d.data(), q_d.data(), k_p, v_p, sinks_d.data(), out_p, lse_d.data(), shape,
                                 nullptr);
  OSSRL_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> out = test::from_device_bf16(out_d);
  const std::vector<float> lse = lse_d.download();

  // The oracle, sequence by sequence. The backward is given the GPU's out and lse (the
  // backward is a function of them), so its comparison isolates the backward kernel.
  std::vector<float> out_ref(size_t(n * q_row)), lse_ref(size_t(n * c.heads));
  std::vector<float> dq_ref(size_t(n * q_row), 0.0f), dk_ref(size_t(n * kv_row), 0.0f), dv_ref(dk_ref);
  std::vector<float> dsinks_ref = dsinks_init;
  for (int s = 0; s < n_seqs; ++s) {
    const int64_t t0 = offsets[size_t(s)];
    AttentionDims d;
    d.n_queries = c.lengths[size_t(s)];
    d.n_keys = c.lengths[size_t(s)];
    d.heads = c.heads;
    d.kv_heads = c.kv_heads;
    d.head_dim = kHeadDim;
    d.sliding_window = c.sliding_window;
    attention_forward(out_ref.data() + t0 * q_row, lse_ref.data() + t0 * c.heads, q.data() + t0 * q_row,
                      k.data() + t0 * kv_row, v.data() + t0 * kv_row, sinks.data(), d);
    attention_backward(dq_ref.data() + t0 * q_row, dk_ref.data() + t0 * kv_row, dv_ref.data() + t0 * kv_row,
                       dsinks_ref.data(), dout.data() + t0 * q_row, q.data() + t0 * q_row, k.data() + t0 * kv_row,
                       v.data() + t0 * kv_row, sinks.data(), out.data() + t0 * q_row, lse.data() + t0 * c.heads, d);
  }

  // out: rounded to bf16 (2^-9 of max |out|), P rounded to bf16 for P V (2^-9 relative per
  // weight, <= ~2^-9 max |v| in all), q split hi + lo (~2^-17): 1e-2 of max |out| leaves room,
  // while a key dropped or added by a mask is off by ~1/window or more.
  expect_close({"out", c.heads, kHeadDim}, out, out_ref, 1e-2, true, offsets, what);
  // lse: the kernel sums the bf16-rounded weights (each within 2^-9 relative, all positive),
  // so |Δlse| <= 2^-9 ≈ 2e-3 plus fp32 noise; absolute, since lse is O(1..10).
  expect_close({"lse", c.heads, 1}, lse, lse_ref, 3e-3, false, offsets, what);
  // Gradients: the kernel's products take bf16 operands (dout, P, dS, q for dK), each within
  // 2^-9 relative, summed with random signs over up to ~1000 queries x group heads, so
  // ~2^-8 ≈ 4e-3 of a typical element; 2e-2 of max |grad| leaves room, while a missing key,
  // query head or sink term moves whole elements.
  expect_close({"dq", c.heads, kHeadDim}, dq_d.download(), dq_ref, 2e-2, true, offsets, what);
  expect_close({"dk", c.kv_heads, kHeadDim}, dk_d.download(), dk_ref, 2e-2, true, offsets, what);
  expect_close({"dv", c.kv_heads, kHeadDim}, dv_d.download(), dv_ref, 2e-2, true, offsets, what);
  // dsinks: both sum exp(sink - lse) D in fp32 from the same lse and out, in different orders
  // (D from bf16 dout on neither side): the increments agree to ~1e-6 relative; 1e-3 of the
  // largest increment.
  std::vector<float> dsinks = dsinks_d.download(), dsinks_increment(dsinks.size()), ref_increment(dsinks.size());
  for (size_t h = 0; h < dsinks.size(); ++h) {
    dsinks_increment[h] = dsinks[h] - dsinks_init[h];
    ref_increment[h] = dsinks_ref[h] - dsinks_init[h];
  }
  expect_close({"dsinks increment", c.heads, 1, false}, dsinks_increment, ref_increment, 1e-3, true, offsets, what);
}

// Lengths around the 64-row tiles and the 128 window, each alone and all in one ragged call.
const std::vector<int> kLengths = {1, 127, 128, 129, 1000};
const std::vector<int> kRagged = {129, 1, 64, 1000, 65, 127, 300, 128, 2};

// GQA ratios 1, 2 and 8 on few heads (the oracle stays cheap), every window.
TEST(FlashAttention, SmallGroupsAllWindows) {
  OSSRL_REQUIRE_GPU();
  struct HeadLayout {
    int heads, kv_heads;
  };
  for (const HeadLayout layout : {HeadLayout{4, 4}, HeadLayout{4, 2}, HeadLayout{8, 1}}) {
    for (const int window : {0, 8, 16, 128}) {
      for (const int length : kLengths) run_case({layout.heads, layout.kv_heads, window, {length}});
      run_case({layout.heads, layout.kv_heads, window, kRagged, 100});
    }
  }
}

// gpt-oss-20b's 64 query heads on 8 kv heads, its two layer kinds (full and window 128).
TEST(FlashAttention, GptOss20bHeads) {
  OSSRL_REQUIRE_GPU();
  for (const int window : {0, 128}) {
    run_case({64, 8, window, {1000}});
    run_case({64, 8, window, {129, 1, 700, 64, 200}});
  }
}

TEST(FlashAttention, EmptyBatchLaunchesNothing) {
  OSSRL_REQUIRE_GPU();
  cuda::FlashAttentionShape shape;
  shape.heads = 64;
  shape.kv_heads = 8;
  cuda::flash_attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, shape, nullptr);
  cuda::flash_attention_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                 nullptr, nullptr, nullptr, shape, nullptr);
  OSSRL_CUDA_CHECK(cudaDeviceSynchronize());
}

TEST(FlashAttention, RejectsBadShapes) {
  OSSRL_REQUIRE_GPU();
  cuda::FlashAttentionShape shape;
  shape.n_seqs = 1;
  shape.n_tokens = 1;
  shape.max_seq_len = 1;
  shape.heads = 64;
  shape.kv_heads = 8;
  shape.head_dim = 128;
  EXPECT_THROW(cuda::flash_attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, shape, nullptr),
               Error);
  shape.head_dim = 64;
  shape.kv_heads = 7;
  EXPECT_THROW(cuda::flash_attention_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                              nullptr, nullptr, nullptr, nullptr, shape, nullptr),
               Error);
}

}  // namespace
}  // namespace ossrl
