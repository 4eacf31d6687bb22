#include "model/cpu_model.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "model/cpu/attention.h"
#include "model/cpu/linear.h"
#include "model/cpu/moe.h"
#include "model/cpu/rmsnorm.h"
#include "model/cpu/rope.h"
#include "model/checkpoint_check.h"

namespace ossrl {

namespace {

// Checks a ragged batch description against its tokens and caches.
void check_batch(std::span<const int32_t> tokens, std::span<const int32_t> offsets, size_t n_caches) {
  OSSRL_CHECK(offsets.size() >= 2 && offsets.front() == 0 && size_t(offsets.back()) == tokens.size(),
              "ragged batch: offsets must start at 0 and end at the token count {}", tokens.size());
  OSSRL_CHECK(n_caches == offsets.size() - 1, "ragged batch: {} sequences but {} caches",
              offsets.size() - 1, n_caches);
  for (size_t b = 0; b + 1 < offsets.size(); ++b) {
    OSSRL_CHECK(offsets[b + 1] > offsets[b], "ragged batch: sequence {} has no tokens", b);
  }
}

// log_softmax(logits [vocab])[target].
float log_prob_of(const float* logits, int64_t vocab, int32_t target) {
  const float max_logit = *std::max_element(logits, logits + vocab);
  float sum = 0.0f;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(logits[i] - max_logit);
  return logits[target] - max_logit - std::log(sum);
}

}  // namespace

CpuModel::CpuModel(const std::string& dir)
    : config_(GptOssConfig::from_file(dir + "/config.json")),
      checkpoint_(Checkpoint::open(dir)),
      // Validation first: it names every missing or misshapen tensor against config.json.
      weights_((validate_gpt_oss_checkpoint(checkpoint_, config_),
                load_gpt_oss_weights(checkpoint_, config_))),
      rope_(rope_frequencies(config_.rope, config_.head_dim)) {}

void CpuModel::attention_block(float* x, int l, std::span<const int32_t> offsets,
                               std::span<KvCache* const> caches) {
  const GptOssConfig& c = config_;
  const AttentionWeights& w = weights_.layers[size_t(l)].attn;
  const int64_t n = offsets.back();
  const int64_t q_dim = int64_t(c.num_attention_heads) * c.head_dim;
  const int64_t kv_dim = int64_t(c.num_key_value_heads) * c.head_dim;
  auto bias = [](const std::vector<float>& b) { return b.empty() ? nullptr : b.data(); };

  std::vector<float> xn(size_t(n * c.hidden_size));
  rmsnorm_forward(xn.data(), nullptr, x, weights_.layers[size_t(l)].input_layernorm.data(), n,
                  c.hidden_size, float(c.rms_norm_eps));
  std::vector<float> q(size_t(n * q_dim)), k(size_t(n * kv_dim)), v(size_t(n * kv_dim));
  linear_forward(q.data(), xn.data(), w.q_proj, bias(w.q_bias), n);
  linear_forward(k.data(), xn.data(), w.k_proj, bias(w.k_bias), n);
  linear_forward(v.data(), xn.data(), w.v_proj, bias(w.v_bias), n);

  std::vector<float> heads_out(size_t(n * q_dim));
  for (size_t b = 0; b + 1 < offsets.size(); ++b) {
    KvCache& cache = *caches[b];
    const int64_t t0 = offsets[b];
    const int64_t len = offsets[b + 1] - t0;
    // Positions continue from what the cache holds: a decode query is not at position 0.
    const int64_t position = cache.length();
    rope_forward(q.data() + t0 * q_dim, len, c.num_attention_heads, c.head_dim, position, rope_);
    rope_forward(k.data() + t0 * kv_dim, len, c.num_key_value_heads, c.head_dim, position, rope_);
    cache.append(l, k.data() + t0 * kv_dim, v.data() + t0 * kv_dim, len);
    const KvCache::Layer& kv = cache.layer(l);
    AttentionDims dims;
    dims.n_queries = len;
    dims.first_query_position = position;
    dims.n_keys = int64_t(kv.k.size()) / kv_dim;
    dims.first_key_position = kv.first_position;
    dims.heads = c.num_attention_heads;
    dims.kv_heads = c.num_key_value_heads;
    dims.head_dim = c.head_dim;
    dims.sliding_window = kv.sliding_window;
    attention_forward(heads_out.data() + t0 * q_dim, nullptr, q.data() + t0 * q_dim, kv.k.data(),
                      kv.v.data(), w.sinks.data(), dims);
  }
  std::vector<float> o(size_t(n * c.hidden_size));
  linear_forward(o.data(), heads_out.data(), w.o_proj, bias(w.o_bias), n);
  for (int64_t i = 0; i < n * c.hidden_size; ++i) x[i] += o[size_t(i)];
}

void CpuModel::moe_block(float* x, int l, int64_t n) {
  const GptOssConfig& c = config_;
  const LayerWeights& w = weights_.layers[size_t(l)];
  MoeDims dims;
  dims.hidden = c.hidden_size;
  dims.intermediate = c.intermediate_size;
  dims.experts = c.num_local_experts;
  dims.experts_per_token = c.experts_per_token;
  dims.swiglu_limit = float(c.swiglu_limit);

  std::vector<float> xn(size_t(n * c.hidden_size));
  rmsnorm_forward(xn.data(), nullptr, x, w.post_attention_layernorm.data(), n, c.hidden_size,
                  float(c.rms_norm_eps));
  std::vector<float> out(size_t(n * c.hidden_size));
  std::vector<float> router_logits(size_t(n * c.num_local_experts));
  std::vector<int32_t> expert_index(size_t(n * c.experts_per_token));
  std::vector<float> expert_weight(size_t(n * c.experts_per_token));
  moe_forward(out.data(), router_logits.data(), expert_index.data(), expert_weight.data(), xn.data(),
              n, w.mlp, dims);
  for (int64_t i = 0; i < n * c.hidden_size; ++i) x[i] += out[size_t(i)];
}

std::vector<float> CpuModel::final_hidden(std::span<const int32_t> tokens,
                                          std::span<const int32_t> offsets,
                                          std::span<KvCache* const> caches) {
  check_batch(tokens, offsets, caches.size());
  const int64_t n = int64_t(tokens.size());
  std::vector<float> x(size_t(n * config_.hidden_size));
  embedding_forward(x.data(), tokens.data(), n, weights_.embed_tokens);
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    attention_block(x.data(), l, offsets, caches);
    moe_block(x.data(), l, n);
  }
  for (size_t b = 0; b < caches.size(); ++b) caches[b]->commit(offsets[b + 1] - offsets[b]);
  rmsnorm_forward(x.data(), nullptr, x.data(), weights_.norm.data(), n, config_.hidden_size,
                  float(config_.rms_norm_eps));
  return x;
}

std::vector<float> CpuModel::forward(std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                                     std::span<KvCache* const> caches, LogitsFor which) {
  std::vector<float> hidden = final_hidden(tokens, offsets, caches);
  const int64_t h = config_.hidden_size;
  int64_t rows = int64_t(tokens.size());
  if (which == LogitsFor::LastTokens) {
    rows = int64_t(offsets.size()) - 1;
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t last = offsets[size_t(b) + 1] - 1;
      std::copy(hidden.begin() + last * h, hidden.begin() + (last + 1) * h, hidden.begin() + b * h);
    }
  }
  std::vector<float> logits(size_t(rows * config_.vocab_size));
  linear_forward(logits.data(), hidden.data(), weights_.lm_head, nullptr, rows);
  return logits;
}

std::vector<float> CpuModel::log_probs(std::span<const int32_t> tokens, std::span<const int32_t> offsets) {
  std::vector<KvCache> caches;
  std::vector<KvCache*> cache_ptrs;
  caches.reserve(offsets.size() - 1);
  for (size_t b = 0; b + 1 < offsets.size(); ++b) cache_ptrs.push_back(&caches.emplace_back(config_));
  const std::vector<float> hidden = final_hidden(tokens, offsets, cache_ptrs);

  // Row r predicts token r + 1 of the same sequence. Rows are pushed through lm_head a
  // chunk at a time: enough to amortise decoding the head, small next to the vocabulary.
  std::vector<int64_t> predicting;  // rows whose next token is in the same sequence
  for (size_t b = 0; b + 1 < offsets.size(); ++b) {
    for (int64_t r = offsets[b]; r + 1 < offsets[b + 1]; ++r) predicting.push_back(r);
  }
  constexpr int64_t kChunk = 16;
  const int64_t h = config_.hidden_size;
  const int64_t vocab = config_.vocab_size;
  std::vector<float> rows(size_t(kChunk * h)), logits(size_t(kChunk * vocab));
  std::vector<float> result(tokens.size(), 0.0f);
  for (size_t i0 = 0; i0 < predicting.size(); i0 += kChunk) {
    const int64_t m = std::min<int64_t>(kChunk, int64_t(predicting.size() - i0));
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = predicting[i0 + size_t(i)];
      std::copy(hidden.begin() + r * h, hidden.begin() + (r + 1) * h, rows.begin() + i * h);
    }
    linear_forward(logits.data(), rows.data(), weights_.lm_head, nullptr, m);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = predicting[i0 + size_t(i)];
      result[size_t(r + 1)] = log_prob_of(logits.data() + i * vocab, vocab, tokens[size_t(r + 1)]);
    }
  }
  return result;
}

}  // namespace ossrl
