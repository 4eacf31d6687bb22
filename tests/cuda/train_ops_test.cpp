// The GPU training path's small ops against their CPU oracles: rmsnorm and rope backward, the
// lm_head's chunked log-probs forward and backward (cuda/logprobs.h), AdamW with clipping and
// the bf16 refresh (cuda/adamw.h). Odd shapes throughout; each tolerance says where it comes from.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include "cuda/adamw.h"
#include "cuda/gpu_test.h"
#include "cuda/logprobs.h"
#include "cuda/rmsnorm.h"
#include "cuda/rope.h"
#include "model/config.h"
#include "model/cpu/linear.h"
#include "model/cpu/lm_head.h"
#include "model/cpu/rmsnorm.h"
#include "model/cpu/rope.h"
#include "model/rope.h"
#include "train/optimizer.h"

namespace ossrl {
namespace {

using cuda::DeviceBuffer;
using test::bf16_ptr;
using test::expect_close;
using test::normal_vector;
using test::round_bf16;
using test::to_device_bf16;
using test::uniform_ints;

constexpr int kRowCounts[] = {1, 127, 128, 129, 1000};

TEST(CudaTrainOps, RmsNormBackwardMatchesCpu) {
  OSSRL_REQUIRE_GPU();
  const float eps = 1e-5f;
  for (int hidden : {64, 203, 2880}) {  // 203: the unvectorised path
    std::vector<float> weight = normal_vector(size_t(hidden), 3, 0.3f);
    for (float& w : weight) w += 1.0f;
    DeviceBuffer<float> weight_d(weight);
    for (int n : kRowCounts) {
      const std::string shape = "hidden " + std::to_string(hidden) + ", n " + std::to_string(n);
      std::vector<float> x = normal_vector(size_t(n) * hidden, 4 + n, 3.0f);
      for (int r = 0; r < n; ++r) {  // rows of different scales
        for (int j = 0; j < hidden; ++j) x[size_t(r) * hidden + j] *= 0.1f + float(r % 7);
      }
      const std::vector<float> dy = normal_vector(x.size(), 5 + n);
      const std::vector<float> dx0 = normal_vector(x.size(), 6 + n);  // dx accumulates
      std::vector<float> y(x.size()), rstd(static_cast<size_t>(n)), want = dx0;
      rmsnorm_forward(y.data(), rstd.data(), x.data(), weight.data(), n, hidden, eps);
      rmsnorm_backward(want.data(), nullptr, dy.data(), x.data(), weight.data(), rstd.data(), n, hidden);

      DeviceBuffer<float> x_d(x), dy_d(dy), dx_d(dx0);
      cuda::rmsnorm_backward(dx_d.data(), dy_d.data(), x_d.data(), weight_d.data(), n, hidden, eps, nullptr);

      // Both sides compute r·(g·w - (x·r)·mean) in the same grouping; they differ in the order of
      // two row sums (Σx² for r, Σ g·w·x·r for the mean): the CPU's sequential fp32 sums drift by
      // ~√hidden·2^-24 ≈ 3e-6 of the sum of magnitudes, the GPU's tree far less. Bound: 3e-5 of
      // each term's magnitude, plus the rounding of the += into dx0.
      std::vector<double> scale(x.size());
      for (int r = 0; r < n; ++r) {
        const size_t row = size_t(r) * hidden;
        const double rr = rstd[size_t(r)];
        double mean_abs = 0.0;
        for (int j = 0; j < hidden; ++j) {
          mean_abs += std::abs(double(dy[row + j]) * weight[size_t(j)] * x[row + j] * rr);
        }
        mean_abs /= hidden;
        for (int j = 0; j < hidden; ++j) {
          scale[row + j] =
              rr * (std::abs(double(dy[row + j]) * weight[size_t(j)]) + std::abs(x[row + j] * rr) * mean_abs);
        }
      }
      expect_close(dx_d.download(), want,
                   [&](size_t i) { return 3e-5 * scale[i] + 2e-7 * std::abs(want[i]) + 1e-30; }, shape);
    }
  }
}

TEST(CudaTrainOps, RopeBackwardMatchesCpu) {
  OSSRL_REQUIRE_GPU();
  struct Shape {
    int n, heads, kv_heads, head_dim;
  };
  const Shape shapes[] = {{1, 64, 8, 64}, {127, 8, 2, 64}, {128, 4, 4, 64}, {129, 4, 1, 32}, {1000, 64, 8, 64}};
  const GptOssConfig config = GptOssConfig::gpt_oss_20b();  // YaRN factor 32
  for (const Shape& s : shapes) {
    const std::string shape = "n " + std::to_string(s.n) + ", heads " + std::to_string(s.heads) + "/" +
                              std::to_string(s.kv_heads) + ", head_dim " + std::to_string(s.head_dim);
    const RopeFrequencies freqs = rope_frequencies(config.rope, s.head_dim);
    const int half = s.head_dim / 2;
    const int q_width = s.heads * s.head_dim, kv_width = s.kv_heads * s.head_dim;
    const int width = q_width + 2 * kv_width;
    const std::vector<float> dq = normal_vector(size_t(s.n) * q_width, 7 + s.n);
    const std::vector<float> dk = normal_vector(size_t(s.n) * kv_width, 8 + s.n);
    const std::vector<float> dv = normal_vector(size_t(s.n) * kv_width, 9 + s.n);
    // Positions up to 1e5 and the last one the config allows: angles of 1e5 radians.
    std::vector<int32_t> positions = uniform_ints(size_t(s.n), 100001, 10 + s.n);
    positions[0] = 100000;
    if (s.n > 1) positions[1] = config.max_position_embeddings - 1;
    if (s.n > 2) positions[2] = 0;

    // CPU: rope_backward on each token's q and k gradients at its own position; v copied.
    std::vector<float> want(size_t(s.n) * width);
    for (int t = 0; t < s.n; ++t) {
      float* row = want.data() + int64_t(t) * width;
      std::copy_n(dq.data() + int64_t(t) * q_width, q_width, row);
      std::copy_n(dk.data() + int64_t(t) * kv_width, kv_width, row + q_width);
      std::copy_n(dv.data() + int64_t(t) * kv_width, kv_width, row + q_width + kv_width);
      rope_backward(row, 1, s.heads, s.head_dim, positions[size_t(t)], freqs);
      rope_backward(row + q_width, 1, s.kv_heads, s.head_dim, positions[size_t(t)], freqs);
    }

    DeviceBuffer<float> dq_d(dq), dk_d(dk), dv_d(dv), inv_freq_d(freqs.inv_freq);
    DeviceBuffer<float> dqkv_d(std::vector<float>(want.size(), std::numeric_limits<float>::quiet_NaN()));
    DeviceBuffer<int32_t> positions_d(positions);
    cuda::rope_qkv_backward(dqkv_d.data(), dq_d.data(), dk_d.data(), dv_d.data(), positions_d.data(),
                            inv_freq_d.data(), freqs.attention_scaling, s.n, s.heads, s.kv_heads, s.head_dim, nullptr);

    // The same products and sums in the same rounding (no fused multiply-add on either side);
    // only CUDA's sincosf and glibc's differ, by up to 2 ulp of cos and sin (scaled by 1.35):
    // well within 2e-6 of the pair's norm (inputs are unit-scale). v is copied exactly.
    const std::vector<float> got = dqkv_d.download();
    expect_close(got, want,
                 [&](size_t i) {
                   const size_t j = i % size_t(s.head_dim), base = i - j;
                   if (int(base % size_t(width)) >= q_width + kv_width) return 0.0;  // v
                   const size_t a = base + j % size_t(half);
                   return 2e-6 * std::max(1.0, double(std::hypot(want[a], want[a + size_t(half)])));
                 },
                 shape);
  }
}

// --- lm_head log-probs -------------------------------------------------------------------

struct LogprobsCase {
  int rows, vocab, hidden;
  size_t workspace;  // bytes: picks the block (rows x vocabulary chunk), see LmHeadLogprobs
  int chunk;         // the vocabulary chunk that gives: the dhidden GEMM's K per pass
  const char* what;
};

// Tensor cores add each k-step of 16 products into the fp32 accumulator rounding toward zero
// (Fasi et al., "Numerical behavior of NVIDIA tensor cores"; Khattak and Mikaitis for H100):
// up to 2^-23 of the running sum per step, the same sign every time, so a sum of K terms may
// drift by K/16 · 2^-23 of the sum of its magnitudes.
double accumulation_bound(int k) { return double(k) / 16 * 0x1p-23; }

// How far the GPU's logits (and so its lse and log-probs) may be from the exact ones: each fp32
// logit is a tensor-core dot product over `hidden` terms (logit_bound = accumulation_bound plus
// the final rounding, times Σ|h·w|, `magnitude`), and the GPU's sums over the vocabulary add
// ~1e-6 in the log (exp to 2 ulp, tree-summed): within 1e-5 on top.
double logit_tolerance(double logit_bound, double magnitude) { return 1e-5 + logit_bound * magnitude; }

// Per-row values in double from the same bf16 inputs (products exact, sums in double): the
// reference the GPU is held to tightly. The CPU oracle sums exp in fp32 in sequence, which
// drifts by up to ~vocab·2^-24 in the log at 201088 entries, so it is checked more loosely.
struct ExactRow {
  double lse = 0, logp = 0, entropy = 0;
  double magnitude = 0;  // max over v of Σ_k |h_k w_vk|: the scale of a logit's fp32 rounding
};

// The reference for one row's backward, with dz_v = bf16(fp32(dlogp · (1[v == t] - p_v))) rounded
// as the GPU rounds the logits' gradient: dh [hidden] = Σ_v dz_v w_vk in double; spread [hidden]
// = Σ_{v≠t} |dz_v w_vk|, the scale of the non-target terms; tie_slack [hidden] = Σ |w_vk| · one
// bf16 step of dz_v over the v whose fp32 dz lies so near a bf16 rounding tie that the GPU's
// value, a few last bits away (its own logits and lse), may round to the other side.
struct ExactRowGrad {
  std::vector<double> dh, spread, tie_slack;
};

// logit_bound: see logit_tolerance, which bounds the GPU's logits, lse and log-probs.
ExactRow exact_row(const float* h, const std::vector<float>& w, int vocab, int hidden, int32_t target, float dlogp,
                   double logit_bound, ExactRowGrad* grad) {
  std::vector<double> z(static_cast<size_t>(vocab));
  ExactRow row;
  for (int v = 0; v < vocab; ++v) {
    double dot = 0, magnitude = 0;
    const float* wv = w.data() + int64_t(v) * hidden;
    for (int k = 0; k < hidden; ++k) {
      dot += double(h[k]) * wv[k];
      magnitude += std::abs(double(h[k]) * wv[k]);
    }
    z[size_t(v)] = dot;
    row.magnitude = std::max(row.magnitude, magnitude);
  }
  const double max = *std::max_element(z.begin(), z.end());
  double sum = 0, weighted = 0;
  for (double zv : z) {
    sum += std::exp(zv - max);
    weighted += std::exp(zv - max) * zv;
  }
  row.lse = max + std::log(sum);
  row.logp = z[size_t(target)] - row.lse;
  row.entropy = row.lse - weighted / sum;
  if (grad == nullptr) return row;

  // The GPU's p_v = exp(z_v - lse) is within 2·logit_error of ours, relative.
  const double logit_error = logit_tolerance(logit_bound, row.magnitude);
  grad->dh.assign(size_t(hidden), 0.0);
  grad->spread.assign(size_t(hidden), 0.0);
  grad->tie_slack.assign(size_t(hidden), 0.0);
  for (int v = 0; v < vocab; ++v) {
    const float p = float(std::exp(z[size_t(v)] - row.lse));
    const float dz_f = v == target ? -dlogp * p + dlogp : -dlogp * p;
    const uint16_t rounded = f32_to_bf16(dz_f);
    const double dz = bf16_to_f32(rounded);
    double step = 0;  // one bf16 step towards dz_f's side, where dz_f is near the tie
    if (dz_f != 0) {
      const bool away = std::abs(dz_f) > std::abs(dz);  // from zero: the next larger magnitude
      const double other = bf16_to_f32(uint16_t(away ? rounded + 1 : rounded - 1));
      const double window = 2 * logit_error * std::abs(double(dlogp) * p) + 4 * 0x1p-24 * std::abs(dz_f);
      if (std::abs(dz_f - 0.5 * (dz + other)) <= window) step = std::abs(other - dz);
    }
    const float* wv = w.data() + int64_t(v) * hidden;
    for (int k = 0; k < hidden; ++k) {
      grad->dh[size_t(k)] += dz * wv[k];
      if (v != target) grad->spread[size_t(k)] += std::abs(dz * wv[k]);
      grad->tie_slack[size_t(k)] += step * std::abs(wv[k]);
    }
  }
  return row;
}

void check_logprobs(const LogprobsCase& c, uint64_t seed) {
  const std::string what = std::string(c.what) + ": rows " + std::to_string(c.rows) + ", vocab " +
                           std::to_string(c.vocab) + ", hidden " + std::to_string(c.hidden);
  const int n = c.rows, vocab = c.vocab, h = c.hidden;
  // Logits of standard deviation ~2 and a few rows where one token dominates (p ~ 1).
  const std::vector<float> hidden = round_bf16(normal_vector(size_t(n + 1) * h, seed));
  const std::vector<float> w = round_bf16(normal_vector(size_t(vocab) * h, seed + 1, 2.0f / std::sqrt(float(h))));
  // tokens[t] is what row t - 1 predicts, as the CPU oracle reads a sequence; the GPU takes
  // rows 0..n-1 with targets tokens[1..n]. Targets at both ends of the vocabulary and at the
  // 8192 chunk edge.
  std::vector<int32_t> tokens = uniform_ints(size_t(n + 1), vocab, seed + 2);
  tokens[1] = vocab - 1;
  if (n >= 2) tokens[2] = 0;
  if (n >= 3) tokens[3] = std::min(vocab - 1, 8191);
  if (n >= 4) tokens[4] = std::min(vocab - 1, 8192);
  std::vector<float> dlogp_t = normal_vector(size_t(n + 1), seed + 3);
  for (int t = 5; t <= n; t += 7) dlogp_t[size_t(t)] = 0.0f;  // rows the loss does not see
  const std::vector<int32_t> targets(tokens.begin() + 1, tokens.end());
  const std::vector<float> dlogp(dlogp_t.begin() + 1, dlogp_t.end());

  // GPU
  const DeviceBuffer<uint16_t> hidden_d = to_device_bf16(std::vector<float>(hidden.begin(), hidden.end() - h));
  const DeviceBuffer<uint16_t> w_d = to_device_bf16(w);
  DeviceBuffer<int32_t> targets_d(targets);
  const size_t rows = static_cast<size_t>(n);
  DeviceBuffer<float> logp_d(rows), lse_d(rows), entropy_d(rows), dlogp_d(dlogp);
  DeviceBuffer<float> dhidden_d(std::vector<float>(size_t(n) * h, std::numeric_limits<float>::quiet_NaN()));
  cuda::Blas blas(nullptr);
  cuda::LmHeadLogprobs lm_head(n, h, vocab, c.workspace);
  EXPECT_LE(lm_head.bytes(), c.workspace) << what;
  lm_head.forward(blas, logp_d.data(), lse_d.data(), entropy_d.data(), bf16_ptr(hidden_d), bf16_ptr(w_d),
                  targets_d.data(), n);
  lm_head.backward(blas, dhidden_d.data(), dlogp_d.data(), bf16_ptr(hidden_d), bf16_ptr(w_d), targets_d.data(),
                   lse_d.data(), n);
  const std::vector<float> logp = logp_d.download(), lse = lse_d.download(), entropy = entropy_d.download();
  const std::vector<float> dhidden = dhidden_d.download();

  // The CPU oracle over the one sequence.
  const WeightMatrix lm_head_cpu = fp32_matrix(w.data(), vocab, h);
  const std::vector<int32_t> offsets = {0, n + 1};
  std::vector<float> cpu_logp(size_t(n + 1)), cpu_lse(size_t(n + 1)), cpu_entropy(size_t(n + 1));
  next_token_log_probs(cpu_logp.data(), cpu_lse.data(), cpu_entropy.data(), hidden.data(), tokens, offsets,
                       lm_head_cpu);
  std::vector<float> cpu_dhidden(size_t(n + 1) * h, 0.0f);
  next_token_log_probs_backward(cpu_dhidden.data(), dlogp_t.data(), hidden.data(), tokens, offsets, cpu_lse.data(),
                                lm_head_cpu);

  // The double reference, row by row.
  const double logit_bound = accumulation_bound(h) + 8 * 0x1p-24;
  std::vector<ExactRow> exact(rows);
  std::vector<ExactRowGrad> exact_grad(rows);
#pragma omp parallel for schedule(dynamic)
  for (int r = 0; r < n; ++r) {
    exact[size_t(r)] = exact_row(hidden.data() + int64_t(r) * h, w, vocab, h, targets[size_t(r)], dlogp[size_t(r)],
                                 logit_bound, &exact_grad[size_t(r)]);
  }

  // GPU vs double: within logit_tolerance.
  const auto tight = [&](size_t r) { return logit_tolerance(logit_bound, exact[r].magnitude); };
  std::vector<double> want_logp(rows), want_lse(rows), want_entropy(rows);
  for (int r = 0; r < n; ++r) {
    want_logp[size_t(r)] = exact[size_t(r)].logp;
    want_lse[size_t(r)] = exact[size_t(r)].lse;
    want_entropy[size_t(r)] = exact[size_t(r)].entropy;
  }
  expect_close(logp, want_logp, tight, what + ": logp vs double");
  expect_close(lse, want_lse, tight, what + ": lse vs double");
  // The entropy, log(sum) - E[z - max], adds the error of one more weighted sum.
  expect_close(entropy, want_entropy, [&](size_t r) { return 2 * tight(r); }, what + ": entropy vs double");

  // GPU vs the CPU oracle: the oracle's fp32 sequential sum over the vocabulary may drift by
  // up to ~vocab·2^-24 (relative, hence absolute in the log) on top.
  const double drift = double(vocab) * 0x1p-24;
  const std::vector<float> oracle_logp(cpu_logp.begin() + 1, cpu_logp.end());
  const std::vector<float> oracle_lse(cpu_lse.begin() + 1, cpu_lse.end());
  const std::vector<float> oracle_entropy(cpu_entropy.begin() + 1, cpu_entropy.end());
  expect_close(logp, oracle_logp, [&](size_t r) { return tight(r) + drift; }, what + ": logp vs CPU");
  expect_close(lse, oracle_lse, [&](size_t r) { return tight(r) + drift; }, what + ": lse vs CPU");
  expect_close(entropy, oracle_entropy, [&](size_t r) { return 2 * (tight(r) + drift); }, what + ": entropy vs CPU");

  // dhidden vs double with the GPU's bf16 rounding of dz modelled: what remains is the GPU's p
  // (2·logit error relative, on every term), the GEMM's accumulation over each chunk of the
  // vocabulary (accumulation_bound; the chunks add in fp32), and the dz near a rounding tie
  // that may round the other way (tie_slack).
  const double chunk_bound = accumulation_bound(c.chunk) + double(vocab / c.chunk + 1) * 0x1p-24;
  std::vector<double> want_dhidden(rows * h);
  for (int r = 0; r < n; ++r) {
    std::copy(exact_grad[size_t(r)].dh.begin(), exact_grad[size_t(r)].dh.end(), want_dhidden.begin() + int64_t(r) * h);
  }
  // |dz_t w_tk| <= |dlogp · w_tk|: the target's term.
  const auto target_term = [&](size_t r, size_t k) {
    return std::abs(double(dlogp[r]) * w[size_t(targets[r]) * h + k]);
  };
  expect_close(dhidden, want_dhidden,
               [&](size_t i) {
                 const size_t r = i / size_t(h), k = i % size_t(h);
                 const ExactRowGrad& e = exact_grad[r];
                 return (2 * tight(r) + chunk_bound) * (target_term(r, k) + e.spread[k]) + e.tie_slack[k] + 1e-9;
               },
               what + ": dhidden vs double");

  // dhidden vs the CPU oracle, which keeps dz in fp32: the GPU's bf16 dz moves each term by up
  // to 2^-8 of itself (the target's term is dlogp·(1 - p)·w, the rest sum to the spread), and
  // the oracle's lse drift scales every p by up to e^drift.
  const std::vector<float> oracle_dhidden(cpu_dhidden.begin(), cpu_dhidden.end() - h);
  expect_close(dhidden, oracle_dhidden,
               [&](size_t i) {
                 const size_t r = i / size_t(h), k = i % size_t(h);
                 return (0x1p-8 + drift + chunk_bound) * (target_term(r, k) + exact_grad[r].spread[k]) + 1e-6;
               },
               what + ": dhidden vs CPU");
}

TEST(CudaTrainOps, LmHeadLogprobsMatchCpu) {
  OSSRL_REQUIRE_GPU();
  const size_t mib = size_t(1) << 20;
  // Workspaces that force the block shapes: LmHeadLogprobs gives a block as many rows as fit
  // beside an 8192-wide chunk (or the whole vocabulary when it is narrower), each row costing 6
  // bytes a logit plus 16 of state, then the widest chunk, a multiple of 256, that fits.
  const size_t rows_of_100 = 100 * (1000 * 6 + 16);  // vocab 1000: blocks of 100 rows
  const size_t rows_of_37 = 37 * (8192 * 6 + 16);    // chunks of 8192 x 37 rows
  std::vector<LogprobsCase> cases;
  for (int rows : kRowCounts) cases.push_back({rows, 1000, 64, 64 * mib, 1000, "one block"});
  for (int rows : {129, 1000}) cases.push_back({rows, 1000, 64, rows_of_100, 1000, "blocks of 100 rows"});
  cases.push_back({129, 50257, 64, rows_of_37, 8192, "blocks of 37 rows x 8192 (6 chunks + 1105)"});
  cases.push_back({1000, 50257, 64, 512 * mib, 50257, "whole vocabulary, odd row stride"});
  cases.push_back({129, 201088, 64, 64 * mib, 86528, "chunks of 86528 (2 + 28032)"});
  cases.push_back({33, 50257, 2880, rows_of_37, 8960, "hidden 2880, 33 rows x chunks of 8960 (5 + 5457)"});
  uint64_t seed = 100;
  for (const LogprobsCase& c : cases) {
    check_logprobs(c, seed += 10);
    if (::testing::Test::HasFailure()) return;
  }
}

// --- AdamW ----------------------------------------------------------------------------------

std::vector<uint32_t> bits_of(const std::vector<float>& v) {
  std::vector<uint32_t> out(v.size());
  std::transform(v.begin(), v.end(), out.begin(), [](float x) { return std::bit_cast<uint32_t>(x); });
  return out;
}

TEST(CudaTrainOps, AdamWMatchesCpuBitForBit) {
  OSSRL_REQUIRE_GPU();
  // Three parameters, flat on the GPU in this order; sizes off every power of two.
  const std::vector<size_t> sizes = {1000, 12345, 7};
  const size_t total = std::accumulate(sizes.begin(), sizes.end(), size_t(0));
  std::vector<float> values = normal_vector(total, 1, 0.05f);
  std::vector<float> grads(total, 0.0f);
  std::vector<ParamSpan> spans;
  for (size_t i = 0, offset = 0; i < sizes.size(); offset += sizes[i], ++i) {
    spans.push_back({"p" + std::to_string(i), std::span(values).subspan(offset, sizes[i]),
                     std::span(grads).subspan(offset, sizes[i]), true});
  }
  const AdamWConfig config{0.9, 0.999, 1e-8, 0.01};
  AdamW cpu(config, spans);

  const std::vector<float> zeros(total, 0.0f);
  DeviceBuffer<float> param_d(values), grad_d(total), m_d(zeros), v_d(zeros);
  DeviceBuffer<double> norm_sq_d(1), partials_d(size_t(cuda::kSumOfSquaresPartials));
  // Learning rates of a warm-up; max_grad_norm 1 against grads whose norm doubles from ~0.5
  // (no clipping) to ~16 (clipped), but for one step of grads ~1e-20, whose squares are fp32
  // subnormals (neither side flushes them).
  const double lrs[] = {1e-4, 2e-4, 3e-4, 1e-3, 1e-3, 5e-4};
  for (int step = 0; step < 6; ++step) {
    const std::string what = "step " + std::to_string(step + 1);
    const float grad_scale = step == 4 ? 1e-20f : 0.5f * float(1 << step) / std::sqrt(float(total));
    const std::vector<float> raw = normal_vector(total, 20 + step, grad_scale);
    std::copy(raw.begin(), raw.end(), grads.begin());
    grad_d.upload(raw);

    cuda::sum_of_squares(norm_sq_d.data(), partials_d.data(), grad_d.data(), total, nullptr);
    const double gpu_norm = std::sqrt(norm_sq_d.download()[0]);
    const StepReport report = cpu.step(lrs[step], 1.0, 1.0);
    ASSERT_TRUE(report.applied()) << what;
    // Both sum exact squares in double, in different orders: ~1e-16 relative.
    EXPECT_NEAR(gpu_norm, report.grad_norm, 1e-13 * report.grad_norm) << what;
    // The clip factor as clip_grad_norm forms it, from the GPU's norm.
    const double coef = 1.0 / (gpu_norm + 1e-6);
    const float factor = coef < 1.0 ? float(coef) : 1.0f;
    const cuda::AdamWStep s =
        cuda::adamw_scalars(lrs[step], config.beta1, config.beta2, config.eps, config.weight_decay, step + 1, factor);
    cuda::adamw_step(param_d.data(), m_d.data(), v_d.data(), grad_d.data(), total, s, nullptr);

    // The same fp32 operations in the same order on the same inputs: identical bits.
    EXPECT_EQ(bits_of(param_d.download()), bits_of(values)) << what << ": params";
    std::vector<float> m, v;
    for (size_t i = 0; i < sizes.size(); ++i) {
      m.insert(m.end(), cpu.exp_avg(i).begin(), cpu.exp_avg(i).end());
      v.insert(v.end(), cpu.exp_avg_sq(i).begin(), cpu.exp_avg_sq(i).end());
    }
    EXPECT_EQ(bits_of(m_d.download()), bits_of(m)) << what << ": exp_avg";
    EXPECT_EQ(bits_of(v_d.download()), bits_of(v)) << what << ": exp_avg_sq";
    if (::testing::Test::HasFailure()) return;
  }
}

TEST(CudaTrainOps, SumOfSquaresIsDeterministicAndSeesNonFinite) {
  OSSRL_REQUIRE_GPU();
  DeviceBuffer<double> out(1), partials(size_t(cuda::kSumOfSquaresPartials));
  for (size_t n : {size_t(0), size_t(1), size_t(1000), size_t(10'000'003)}) {
    const std::string what = "n " + std::to_string(n);
    const std::vector<float> grad = normal_vector(n, 30 + n, 1e-3f);
    double want = 0;
    for (float g : grad) want += double(g) * g;
    DeviceBuffer<float> grad_d(grad);
    cuda::sum_of_squares(out.data(), partials.data(), grad_d.data(), n, nullptr);
    const double first = out.download()[0];
    cuda::sum_of_squares(out.data(), partials.data(), grad_d.data(), n, nullptr);
    EXPECT_EQ(std::bit_cast<uint64_t>(out.download()[0]), std::bit_cast<uint64_t>(first)) << what << ": run to run";
    // Exact squares summed in double in two orders: ~n·2^-53 relative at the very worst.
    EXPECT_NEAR(first, want, 1e-15 * double(n) * want) << what;
  }
  for (float bad : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    std::vector<float> grad = normal_vector(5000, 40);
    grad[4321] = bad;
    DeviceBuffer<float> grad_d(grad);
    cuda::sum_of_squares(out.data(), partials.data(), grad_d.data(), grad.size(), nullptr);
    EXPECT_FALSE(std::isfinite(out.download()[0])) << "a grad of " << bad;
  }
}

TEST(CudaTrainOps, ToBf16MatchesHostConversionExactly) {
  OSSRL_REQUIRE_GPU();
  std::vector<uint32_t> bits = {
      0x00000000, 0x80000000,              // ±0
      0x7f800000, 0xff800000,              // ±inf
      0x7fc00000, 0xffc00001, 0x7f800001,  // quiet NaNs, a signalling NaN with a low payload
      0x7fa00000, 0xff812345,              // signalling NaNs whose payload survives in the top bits
      0x00000001, 0x007fffff, 0x80000001,  // subnormals: smallest, largest, negative
      0x00008000, 0x00018000, 0x00400000,  // subnormal ties (to even: down, up) and an exact one
      0x3f808000, 0x3f818000, 0x3f808001,  // normal ties (to even: down, up), just above a tie
      0x7f7fffff, 0x7f7f8000, 0xff7fffff,  // the largest floats round to ±inf; a tie to inf
  };
  std::mt19937_64 rng(50);
  for (int i = 0; i < 1'000'003; ++i) bits.push_back(uint32_t(rng()));  // every class of value
  std::vector<float> values(bits.size());
  std::transform(bits.begin(), bits.end(), values.begin(), [](uint32_t b) { return std::bit_cast<float>(b); });
  std::vector<uint16_t> want(values.size());
  std::transform(values.begin(), values.end(), want.begin(), [](float x) { return f32_to_bf16(x); });

  DeviceBuffer<float> src(values);
  DeviceBuffer<uint16_t> dst(values.size());
  cuda::to_bf16(reinterpret_cast<__nv_bfloat16*>(dst.data()), src.data(), values.size(), nullptr);
  const std::vector<uint16_t> got = dst.download();
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i], want[i]) << "fp32 bits 0x" << std::hex << bits[i] << " at [" << std::dec << i << "]";
  }
}

}  // namespace
}  // namespace ossrl
