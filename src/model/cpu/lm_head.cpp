#include "model/cpu/lm_head.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "model/cpu/linear.h"

namespace ossrl {

namespace {

// Rows per lm_head call: enough to amortise decoding the head, small next to the vocabulary.
constexpr int64_t kRows = 16;
// Vocabulary per chunk: kRows x kVocab logits (256 KiB) at a time, whatever the vocabulary.
constexpr int64_t kVocab = 4096;

// Rows r whose next token r + 1 is in the same sequence, with what they predict: t = r + 1.
std::vector<int64_t> predicted_tokens(std::span<const int32_t> offsets) {
  std::vector<int64_t> out;
  for (size_t b = 0; b + 1 < offsets.size(); ++b) {
    for (int64_t t = offsets[b] + 1; t < offsets[b + 1]; ++t) out.push_back(t);
  }
  return out;
}

// rows [m, hidden] = hidden[predicted[i] - 1] for i in [i0, i0 + m).
void gather_rows(float* rows, const float* hidden, int64_t h, const std::vector<int64_t>& predicted,
                 size_t i0, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = predicted[i0 + size_t(i)] - 1;
    std::copy(hidden + r * h, hidden + (r + 1) * h, rows + i * h);
  }
}

}  // namespace

void next_token_log_probs(float* logp, float* lse, float* entropy, const float* hidden,
                          std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                          const WeightMatrix& lm_head, std::span<const uint8_t> wanted) {
  const int64_t h = lm_head.in;
  const int64_t vocab = lm_head.out;
  std::fill(logp, logp + tokens.size(), 0.0f);
  if (lse) std::fill(lse, lse + tokens.size(), 0.0f);
  if (entropy) std::fill(entropy, entropy + tokens.size(), 0.0f);
  std::vector<int64_t> predicted = predicted_tokens(offsets);
  if (!wanted.empty()) {
    std::erase_if(predicted, [&](int64_t t) { return wanted[size_t(t)] == 0; });
  }
  std::vector<float> rows(size_t(kRows * h)), logits(size_t(kRows * std::min(kVocab, vocab)));
  // Per row, online over the chunks: running max m, Σ exp(z - m), Σ exp(z - m) z, z[target].
  std::vector<float> m(kRows), sum(kRows), zsum(kRows), target(kRows);
  for (size_t i0 = 0; i0 < predicted.size(); i0 += kRows) {
    const int64_t n = std::min<int64_t>(kRows, int64_t(predicted.size() - i0));
    gather_rows(rows.data(), hidden, h, predicted, i0, n);
    std::fill(m.begin(), m.end(), -INFINITY);
    std::fill(sum.begin(), sum.end(), 0.0f);
    std::fill(zsum.begin(), zsum.end(), 0.0f);
    for (int64_t v0 = 0; v0 < vocab; v0 += kVocab) {
      const int64_t v1 = std::min(vocab, v0 + kVocab);
      const int64_t width = v1 - v0;
      linear_forward(logits.data(), rows.data(), weight_rows(lm_head, v0, v1), nullptr, n);
      for (int64_t i = 0; i < n; ++i) {
        const float* z = logits.data() + i * width;
        const float chunk_max = *std::max_element(z, z + width);
        if (chunk_max > m[size_t(i)]) {
          const float rescale = std::exp(m[size_t(i)] - chunk_max);  // 0 on the first chunk
          sum[size_t(i)] *= rescale;
          zsum[size_t(i)] *= rescale;
          m[size_t(i)] = chunk_max;
        }
        const float mi = m[size_t(i)];
        for (int64_t v = 0; v < width; ++v) {
          const float e = std::exp(z[v] - mi);
          sum[size_t(i)] += e;
          if (entropy) zsum[size_t(i)] += e * z[v];
        }
        const int32_t tok = tokens[size_t(predicted[i0 + size_t(i)])];
        if (tok >= v0 && tok < v1) target[size_t(i)] = z[tok - v0];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = predicted[i0 + size_t(i)];
      const float log_sum = std::log(sum[size_t(i)]);
      logp[t] = target[size_t(i)] - m[size_t(i)] - log_sum;
      if (lse) lse[t] = m[size_t(i)] + log_sum;
      if (entropy) entropy[t] = m[size_t(i)] + log_sum - zsum[size_t(i)] / sum[size_t(i)];
    }
  }
}

void next_token_log_probs_backward(float* dhidden, const float* dlogp, const float* hidden,
                                   std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                                   const float* lse, const WeightMatrix& lm_head) {
  const int64_t h = lm_head.in;
  const int64_t vocab = lm_head.out;
  std::vector<int64_t> predicted;
  for (int64_t t : predicted_tokens(offsets)) {
    if (dlogp[t] != 0.0f) predicted.push_back(t);
  }
  std::vector<float> rows(size_t(kRows * h)), drows(size_t(kRows * h));
  std::vector<float> logits(size_t(kRows * std::min(kVocab, vocab)));
  for (size_t i0 = 0; i0 < predicted.size(); i0 += kRows) {
    const int64_t n = std::min<int64_t>(kRows, int64_t(predicted.size() - i0));
    gather_rows(rows.data(), hidden, h, predicted, i0, n);
    std::fill(drows.begin(), drows.end(), 0.0f);
    for (int64_t v0 = 0; v0 < vocab; v0 += kVocab) {
      const int64_t v1 = std::min(vocab, v0 + kVocab);
      const int64_t width = v1 - v0;
      const WeightMatrix chunk = weight_rows(lm_head, v0, v1);
      linear_forward(logits.data(), rows.data(), chunk, nullptr, n);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = predicted[i0 + size_t(i)];
        float* z = logits.data() + i * width;  // becomes dz in place
        const float g = dlogp[t];
        for (int64_t v = 0; v < width; ++v) z[v] = -g * std::exp(z[v] - lse[t]);
        const int32_t tok = tokens[size_t(t)];
        if (tok >= v0 && tok < v1) z[tok - v0] += g;
      }
      linear_backward_input(drows.data(), logits.data(), chunk, n);
    }
    for (int64_t i = 0; i < n; ++i) {
      float* dst = dhidden + (predicted[i0 + size_t(i)] - 1) * h;
      for (int64_t c = 0; c < h; ++c) dst[c] += drows[size_t(i * h + c)];
    }
  }
}

}  // namespace ossrl
