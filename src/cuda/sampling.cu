// Sampling and scoring on the GPU, one cluster of CTAs per row of logits.
//
// Every pass over a row gives each warp of the row's cluster one contiguous segment, read
// lane-strided (coalesced). Few rows (decode at small batches) take several CTAs each: one
// CTA's passes over a 200k-token row are SM-bound, and the GPU's other SMs would idle.
// Probability masses are summed as fixed-point integers (multiples of 2^-62 of the row's
// softmax mass), so every sum is exact and independent of its order: the segment totals, the
// block scan inside a segment and the final walk agree to the last bit, and the draw finds
// exactly one token. Top-k and top-p find their cut by binary search over the probability
// value (a pass per step) instead of sorting the row.
#include "cuda/sampling.h"

#include <climits>
#include <cstdint>
#include <limits>

#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>

#include "cuda/check.h"
#include "cuda/launch.cuh"

namespace ossrl::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRowCtas = 8;  // CTAs per row: the portable cluster size
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kInf = std::numeric_limits<float>::infinity();
// A probability in [0, 1] as an integer multiple of 2^-62: a row's masses, which sum to about
// 1, fit in 64 bits, and a token's rounding (at most 2^-63) is far below fp32 resolution.
using Mass = unsigned long long;
constexpr float kFixedOne = 0x1.0p62f;
__device__ Mass fixed(float p) { return __float2ull_rn(p * kFixedOne); }  // exact: a power-of-2 scale

__device__ int lane_id() { return int(threadIdx.x) % 32; }
__device__ int warp_id() { return int(threadIdx.x) / 32; }

// The row's warps: warp w of the cluster's CTA of rank r is warp r * kWarps + w.
__device__ int row_warps() { return int(cg::this_cluster().num_blocks()) * kWarps; }
__device__ int row_warp() { return int(cg::this_cluster().block_rank()) * kWarps + warp_id(); }

// Row warp `warp`'s part of the row, [begin, end).
struct Segment {
  int begin;
  int end;
};
__device__ Segment warp_segment(int vocab, int warp) {
  const int warps = row_warps();
  const int length = (vocab + warps - 1) / warps;
  const int begin = min(warp * length, vocab);
  return {begin, min(begin + length, vocab)};
}

// fold(... fold(fold(init, v_0), v_1) ..., v_last) of the cluster's CTAs' values v_r (each
// CTA-uniform) in rank order, in every thread of the cluster: the same bits everywhere, and
// with one CTA fold(init, v_0) = v_0. `slot` is a __shared__ T of the caller; the barrier after
// the reads lets the caller reuse it.
template <class T, class Fold>
__device__ T cluster_fold(T mine, T* slot, T init, Fold fold) {
  const cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) *slot = mine;
  cluster.sync();
  T r = init;
  for (unsigned c = 0; c < cluster.num_blocks(); ++c) r = fold(r, *cluster.map_shared_rank(slot, c));
  cluster.sync();
  return r;
}

// f(i, logits[i]) for this lane's ids of `seg`, lane-strided so that each warp access is
// coalesced. kBatch loads are issued before their first use: with one CTA per SM, the
// thread's own loads in flight are what covers the memory latency.
template <class F>
__device__ void for_each_logit(const float* logits, const Segment& seg, F f) {
  constexpr int kBatch = 8;
  for (int first = seg.begin + lane_id(); first < seg.end; first += 32 * kBatch) {
    float l[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = first + 32 * j;
      l[j] = i < seg.end ? logits[i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = first + 32 * j;
      if (i < seg.end) f(i, l[j]);
    }
  }
}

// Running softmax statistics over part of a row: the max logit and its first id, and
// Σ exp(logit - max) at temperature 1 (for the log-prob) and at the sampling temperature.
struct SoftmaxStats {
  float max = -kInf;
  int argmax = INT_MAX;
  float sum = 0.0f;
  float sum_t = 0.0f;  // kept only when tempered: at temperature 1 it is `sum`
};

// A part's sum moved to a larger max: exp(from - to) * s. A part whose max is -inf (masked
// logits) adds nothing, even when `to` is -inf too and the difference would be NaN.
__device__ float rescale(float s, float from, float to, float temperature) {
  return from == -kInf ? 0.0f : s * expf((from - to) / temperature);
}

// The statistics of the union of two parts; symmetric, so every lane of a butterfly and every
// thread merging the warps' results in the same order get the same bits.
__device__ SoftmaxStats merge(const SoftmaxStats& a, const SoftmaxStats& b, float temperature, bool tempered) {
  const bool a_leads = a.max > b.max || (a.max == b.max && a.argmax < b.argmax);
  const SoftmaxStats hi = a_leads ? a : b;
  const SoftmaxStats lo = a_leads ? b : a;
  SoftmaxStats r = hi;
  r.sum = hi.sum + rescale(lo.sum, lo.max, hi.max, 1.0f);
  if (tempered) r.sum_t = hi.sum_t + rescale(lo.sum_t, lo.max, hi.max, temperature);
  return r;
}

__device__ SoftmaxStats shfl_xor(const SoftmaxStats& s, int offset) {
  return {__shfl_xor_sync(kFullMask, s.max, offset), __shfl_xor_sync(kFullMask, s.argmax, offset),
          __shfl_xor_sync(kFullMask, s.sum, offset), __shfl_xor_sync(kFullMask, s.sum_t, offset)};
}

// One pass (online softmax) over logits [vocab]: the same statistics in every thread.
__device__ SoftmaxStats softmax_stats(const float* logits, int vocab, float temperature) {
  __shared__ SoftmaxStats warp_stats[kWarps];
  __shared__ SoftmaxStats cta_stats;
  const bool tempered = temperature != 1.0f && temperature != 0.0f;
  SoftmaxStats s;
  for_each_logit(logits, warp_segment(vocab, row_warp()), [&](int i, float l) {
    // A single logit is its own max: exp(0) = 1 at any temperature.
    s = merge(s, SoftmaxStats{l, i, 1.0f, 1.0f}, temperature, tempered);
  });
  for (int offset = 16; offset > 0; offset /= 2) s = merge(s, shfl_xor(s, offset), temperature, tempered);
  if (lane_id() == 0) warp_stats[warp_id()] = s;
  __syncthreads();
  SoftmaxStats cta;
  for (int w = 0; w < kWarps; ++w) cta = merge(cta, warp_stats[w], temperature, tempered);
  // Its barriers also order these reads of warp_stats before the next call's writes.
  SoftmaxStats row = cluster_fold(cta, &cta_stats, SoftmaxStats{}, [&](const SoftmaxStats& a, const SoftmaxStats& b) {
    return merge(a, b, temperature, tempered);
  });
  if (!tempered) row.sum_t = row.sum;
  return row;
}

__device__ Mass warp_sum(Mass x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// The row's sampling probabilities before truncation as sampling_distribution() computes
// them, p = exp((logit - max) / T) / Σ in the same fp32 operations, so ranks and ties match.
struct Row {
  const float* logits;
  int vocab;
  float max;
  float temperature;
  float sum_t;

  __device__ float weight(float logit) const {  // exp((logit - max) / T), in [0, 1]
    const float x = logit - max;
    return expf(temperature == 1.0f ? x : x / temperature);
  }
  __device__ float prob(float logit) const { return weight(logit) / sum_t; }

  // Σ term(i, p_i) over the row, in every thread; term returns a Mass (or a count), and
  // integer sums make the result independent of the order.
  template <class Term>
  __device__ Mass sum(Term term) const {
    __shared__ Mass warp_totals[kWarps];
    __shared__ Mass cta_total;
    Mass s = 0;
    for_each_logit(logits, warp_segment(vocab, row_warp()), [&](int i, float l) { s += term(i, prob(l)); });
    s = warp_sum(s);
    if (lane_id() == 0) warp_totals[warp_id()] = s;
    __syncthreads();
    Mass total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_totals[w];
    // Its barriers also order these reads of warp_totals before the next call's writes.
    return cluster_fold(total, &cta_total, Mass(0), [](Mass a, Mass b) { return a + b; });
  }
};

// Keeps p > value, and p == value for ids <= last_id: the ranks above a cut in the order
// (p descending, id ascending). The default keeps everything.
struct Cut {
  float value = -1.0f;
  int last_id = INT_MAX;
  __device__ bool keeps(float p, int id) const { return p > value || (p == value && id <= last_id); }
};

// The truncation of sampling_distribution(): top-k, then top-p of what is left, then min-p.
struct Keep {
  Cut top_k;
  Cut top_p;
  float min_p = 0.0f;  // min_p * p_max
  __device__ bool operator()(float p, int id) const { return top_k.keeps(p, id) && top_p.keeps(p, id) && p >= min_p; }
  __device__ bool truncates() const { return top_k.value >= 0.0f || top_p.value >= 0.0f || min_p > 0.0f; }
};

__device__ uint32_t bits(float p) { return __float_as_uint(p); }  // monotone for p >= 0

// The last b in [lo, hi] with holds(b), given holds(lo) and holds true up to some b, then
// false. holds() is cluster-uniform (it reduces over the row), so the loop is too.
template <class Holds>
__device__ uint32_t last_where(uint32_t lo, uint32_t hi, Holds holds) {
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    if (holds(mid)) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Of the tokens that `kept` keeps with probability exactly `value`, the id of the `need`-th
// lowest (INT_MAX when all `ties` of them are needed): the rank order breaks ties by id.
template <class Kept>
__device__ int tie_cut(const Row& row, Kept kept, float value, Mass need, Mass ties) {
  if (need >= ties) return INT_MAX;
  return int(last_where(0, uint32_t(row.vocab - 1), [&](uint32_t b) {
    return row.sum([&](int i, float p) -> Mass { return p == value && kept(p, i) && uint32_t(i) < b; }) < need;
  }));
}

// The k most probable tokens, ties to the lower id.
__device__ Cut top_k_cut(const Row& row, int k, float p_max) {
  const auto everything = [](float, int) { return true; };
  // The k-th largest probability: the largest value with at least k tokens at or above it.
  const float value = __uint_as_float(last_where(0, bits(p_max), [&](uint32_t b) {
    return row.sum([&](int, float p) -> Mass { return bits(p) >= b; }) >= Mass(k);
  }));
  // Tokens above the value (high word) and at it (low word), in one pass.
  const Mass counts = row.sum([&](int, float p) -> Mass { return p > value ? Mass(1) << 32 : p == value; });
  const Mass above = counts >> 32, ties = counts & 0xffffffffu;
  return Cut{value, tie_cut(row, everything, value, Mass(k) - above, ties)};
}

// Among the tokens top-k kept, the smallest most-probable set whose mass reaches top_p of
// theirs (at least one token), ties in rank to the lower id.
__device__ Cut top_p_cut(const Row& row, const Cut& top_k, float top_p, float p_max) {
  const auto kept = [&](float p, int i) { return top_k.keeps(p, i); };
  const auto mass_where = [&](auto&& include) {
    return row.sum([&](int i, float p) -> Mass { return kept(p, i) && include(p) ? fixed(p) : 0; });
  };
  const double target = double(top_p) * double(mass_where([](float) { return true; }));
  // The probability of the last token needed: the largest value whose tokens at or above it
  // reach the target.
  const float value = __uint_as_float(last_where(0, bits(p_max), [&](uint32_t b) {
    return double(mass_where([&](float p) { return bits(p) >= b; })) >= target;
  }));
  const Mass above = mass_where([&](float p) { return p > value; });
  const Mass at = mass_where([&](float p) { return p == value; });
  // Tokens tied at the value share one mass; `above` falls short of the target (else a larger
  // value would have been found), and the lowest ids among the ties close the gap.
  const Mass each = fixed(value);
  if (each == 0) return Cut{value, INT_MAX};  // too small to count: keep every tie
  const Mass ties = at / each;
  const Mass need = min(ties, Mass(ceil((target - double(above)) / double(each))));
  return Cut{value, tie_cut(row, kept, value, need, ties)};
}

// Inverse CDF in token-id order over the kept tokens' masses, at u in [0, 1) of their total:
// the first token whose cumulative mass exceeds u * total. The CTA holding that point is found
// from the CTAs' totals, in it the warp segment from the segment totals, then the token by a
// block scan over that segment. Returns the token in that CTA, -1 in the others.
__device__ int draw_token(const Row& row, const Keep& keep, double u) {
  __shared__ Mass segment_mass[kWarps];
  __shared__ Mass cta_mass;
  __shared__ int token_shared;
  using Scan = cub::BlockScan<Mass, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scan_storage;

  // Masses as exp(...) * (2^62 / Σ), with no division on the untruncated path (the common
  // one); p only decides what is kept.
  const bool truncates = keep.truncates();
  const float scale = kFixedOne / row.sum_t;
  const auto kept_mass = [&](int i, float logit) -> Mass {
    const float w = row.weight(logit);
    return truncates && !keep(w / row.sum_t, i) ? 0 : __float2ull_rn(w * scale);
  };
  Mass s = 0;
  for_each_logit(row.logits, warp_segment(row.vocab, row_warp()), [&](int i, float l) { s += kept_mass(i, l); });
  s = warp_sum(s);
  if (lane_id() == 0) segment_mass[warp_id()] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    Mass mass = 0;
    for (int w = 0; w < kWarps; ++w) mass += segment_mass[w];
    cta_mass = mass;
  }
  const cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int ctas = int(cluster.num_blocks()), rank = int(cluster.block_rank());
  Mass cta_masses[kMaxRowCtas];  // all remote loads issued before the first use
#pragma unroll
  for (int c = 0; c < kMaxRowCtas; ++c) cta_masses[c] = c < ctas ? *cluster.map_shared_rank(&cta_mass, c) : 0;
  cluster.sync();  // no CTA leaves (or reuses cta_mass) while another reads it

  Mass total = 0;
#pragma unroll
  for (int c = 0; c < kMaxRowCtas; ++c) total += cta_masses[c];
  // total > 0: the most probable token is always kept. Clamping to total - 1 makes the last
  // kept token the answer when u * total rounds up to the total (the CPU's fallback too).
  const Mass target = min(__double2ull_rd(u * double(total)), total - 1);
  Mass start = 0;  // the mass of the rows' segments before this CTA's
  for (int c = 0; c < rank; ++c) start += cta_masses[c];
  if (target < start || target >= start + cta_masses[rank]) return -1;  // CTA-uniform
  int owner = rank * kWarps;
  while (target >= start + segment_mass[owner % kWarps]) start += segment_mass[owner++ % kWarps];

  // The owner segment split into contiguous chunks, one per thread.
  const Segment owned = warp_segment(row.vocab, owner);
  const int chunk = (owned.end - owned.begin + kThreads - 1) / kThreads;
  const int begin = min(owned.begin + int(threadIdx.x) * chunk, owned.end);
  const int end = min(begin + chunk, owned.end);
  Mass mine = 0;
  for (int i = begin; i < end; ++i) mine += kept_mass(i, row.logits[i]);
  Mass before = 0;
  Scan(scan_storage).ExclusiveSum(mine, before);
  Mass cumulative = start + before;
  if (cumulative <= target && target < cumulative + mine) {
    for (int i = begin; i < end; ++i) {
      cumulative += kept_mass(i, row.logits[i]);
      if (target < cumulative) {
        token_shared = i;
        break;
      }
    }
  }
  __syncthreads();
  return token_shared;
}

__device__ float logprob_of(const float* logits, int token, const SoftmaxStats& stats) {
  return (logits[token] - stats.max) - logf(stats.sum);
}

// tokens, logprobs [batch]; logits [batch, vocab] fp32. Grid (batch, CTAs per row), a cluster
// per row.
__global__ void __launch_bounds__(kThreads)
    sample_kernel(int32_t* tokens, float* logprobs, const float* logits, const SamplingParams* params,
                  const uint64_t* rng_keys, const uint64_t* rng_draws, int vocab) {
  const int b = blockIdx.x;
  const float* row_logits = logits + int64_t(b) * vocab;
  const SamplingParams sp = params[b];  // a step input: read while the lm_head finishes
  wait_for_producers();
  release_dependents();
  const SoftmaxStats stats = softmax_stats(row_logits, vocab, sp.temperature);
  int token = stats.argmax == INT_MAX ? 0 : stats.argmax;  // greedy: lowest id on ties
  bool writes = cg::this_cluster().block_rank() == 0;
  if (sp.temperature != 0.0f) {
    const Row row{row_logits, vocab, stats.max, sp.temperature, stats.sum_t};
    // The argmax's exp(0) / Σ: no probability is larger, and truncation always keeps it.
    const float p_max = 1.0f / stats.sum_t;
    Keep keep;
    if (sp.top_k > 0 && sp.top_k < vocab) keep.top_k = top_k_cut(row, sp.top_k, p_max);
    if (sp.top_p < 1.0f) keep.top_p = top_p_cut(row, keep.top_k, sp.top_p, p_max);
    keep.min_p = sp.min_p * p_max;
    token = draw_token(row, keep, SamplingRng::uniform(rng_keys[b], rng_draws[b]));
    writes = token >= 0;  // the CTA that drew it
  }
  if (writes && threadIdx.x == 0) {
    tokens[b] = token;
    logprobs[b] = logprob_of(row_logits, token, stats);
  }
}

// out [rows] = log softmax(logits [rows, vocab])[targets]. Grid (rows, CTAs per row), a
// cluster per row.
__global__ void __launch_bounds__(kThreads)
    token_logprobs_kernel(float* out, const float* logits, const int32_t* targets, int vocab) {
  const int r = blockIdx.x;
  const float* row_logits = logits + int64_t(r) * vocab;
  wait_for_producers();
  release_dependents();
  const SoftmaxStats stats = softmax_stats(row_logits, vocab, 1.0f);
  if (cg::this_cluster().block_rank() == 0 && threadIdx.x == 0) out[r] = logprob_of(row_logits, targets[r], stats);
}

// Launches kernel with grid (rows, c), a cluster of c CTAs per row: the most (a power of two
// up to kMaxRowCtas) that keep the grid within one CTA per SM. Both kernels are programmatic
// dependents (cuda/launch.cuh), released after their wait.
template <class... Params, class... Args>
void launch_rows(void (*kernel)(Params...), int rows, cudaStream_t stream, Args... args) {
  int device = 0, sms = 0;
  OSSRL_CUDA_CHECK(cudaGetDevice(&device));
  OSSRL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  unsigned ctas = 1;
  while (ctas < kMaxRowCtas && int64_t(rows) * ctas * 2 <= sms) ctas *= 2;
  const LaunchShape shape{.grid = dim3(unsigned(rows), ctas),
                          .block = kThreads,
                          .cluster = dim3(1, ctas, 1)};
  launch_kernel(kernel, shape, stream, args...);
}

}  // namespace

void sample_tokens(int32_t* tokens, float* logprobs, const float* logits, const SamplingParams* params,
                   const uint64_t* rng_keys, const uint64_t* rng_draws, int batch, int vocab,
                   cudaStream_t stream) {
  if (batch == 0) return;
  launch_rows(sample_kernel, batch, stream, tokens, logprobs, logits, params, rng_keys, rng_draws, vocab);
}

void token_logprobs(float* out, const float* logits, const int32_t* targets, int rows, int vocab,
                    cudaStream_t stream) {
  if (rows == 0) return;
  launch_rows(token_logprobs_kernel, rows, stream, out, logits, targets, vocab);
}

}  // namespace ossrl::cuda
