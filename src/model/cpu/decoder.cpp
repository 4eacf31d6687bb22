#include "model/cpu/decoder.h"

#include <algorithm>

#include "core/error.h"
#include "model/cpu/attention.h"
#include "model/cpu/linear.h"
#include "model/cpu/rmsnorm.h"
#include "model/cpu/rope.h"

namespace ossrl {

namespace {

// Checks a ragged batch description against its tokens and caches (none: whole sequences).
void check_batch(std::span<const int32_t> tokens, std::span<const int32_t> offsets, size_t n_caches) {
  OSSRL_CHECK(offsets.size() >= 2 && offsets.front() == 0 && size_t(offsets.back()) == tokens.size(),
              "ragged batch: offsets must start at 0 and end at the token count {}", tokens.size());
  OSSRL_CHECK(n_caches == 0 || n_caches == offsets.size() - 1, "ragged batch: {} sequences but {} caches",
              offsets.size() - 1, n_caches);
  for (size_t b = 0; b + 1 < offsets.size(); ++b) {
    OSSRL_CHECK(offsets[b + 1] > offsets[b], "ragged batch: sequence {} has no tokens", b);
  }
}

const float* bias_or_null(const std::vector<float>& b) { return b.empty() ? nullptr : b.data(); }

MoeDims moe_dims(const ModelRef& m) {
  const GptOssConfig& c = m.config;
  MoeDims d;
  d.hidden = c.hidden_size;
  d.intermediate = c.intermediate_size;
  d.experts = c.num_local_experts;
  d.experts_per_token = c.experts_per_token;
  d.swiglu_limit = float(c.swiglu_limit);
  d.activations = m.activations;
  return d;
}

// Attention over one whole sequence's own keys, positions from 0 (training layout).
AttentionDims sequence_dims(const GptOssConfig& c, int l, int64_t len) {
  AttentionDims d;
  d.n_queries = len;
  d.first_query_position = 0;
  d.n_keys = len;
  d.first_key_position = 0;
  d.heads = c.num_attention_heads;
  d.kv_heads = c.num_key_value_heads;
  d.head_dim = c.head_dim;
  d.sliding_window = c.layer_types[size_t(l)] == AttentionType::Sliding ? c.sliding_window : 0;
  return d;
}

}  // namespace

void attention_block_forward(float* x, const ModelRef& m, int l, std::span<const int32_t> offsets,
                             std::span<KvCache* const> caches, const LayerAdapters* ad,
                             AttentionActivations* saved) {
  const GptOssConfig& c = m.config;
  const LayerWeights& lw = m.weights.layers[size_t(l)];
  const AttentionWeights& w = lw.attn;
  const int64_t n = offsets.back();
  const int64_t h = c.hidden_size;
  const int64_t q_dim = int64_t(c.num_attention_heads) * c.head_dim;
  const int64_t kv_dim = int64_t(c.num_key_value_heads) * c.head_dim;
  AttentionActivations local;
  AttentionActivations& a = saved ? *saved : local;
  if (saved) a.x.assign(x, x + n * h);

  a.rstd.resize(size_t(n));
  a.xn.resize(size_t(n * h));
  rmsnorm_forward(a.xn.data(), a.rstd.data(), x, lw.input_layernorm.data(), n, h, float(c.rms_norm_eps));
  round_activations(a.xn.data(), n * h, m.activations);
  a.q.resize(size_t(n * q_dim));
  a.k.resize(size_t(n * kv_dim));
  a.v.resize(size_t(n * kv_dim));
  linear_forward(a.q.data(), a.xn.data(), w.q_proj, bias_or_null(w.q_bias), n);
  linear_forward(a.k.data(), a.xn.data(), w.k_proj, bias_or_null(w.k_bias), n);
  linear_forward(a.v.data(), a.xn.data(), w.v_proj, bias_or_null(w.v_bias), n);
  if (ad) {
    lora_forward(a.q.data(), a.xn.data(), nullptr, n, ad->q_proj);
    lora_forward(a.k.data(), a.xn.data(), nullptr, n, ad->k_proj);
    lora_forward(a.v.data(), a.xn.data(), nullptr, n, ad->v_proj);
  }
  round_activations(a.v.data(), n * kv_dim, m.activations);  // as the KV cache holds v
  const float* sinks = ad && ad->sinks ? ad->sinks : w.sinks.data();

  a.heads_out.resize(size_t(n * q_dim));
  a.lse.resize(size_t(n * c.num_attention_heads));
  for (size_t b = 0; b + 1 < offsets.size(); ++b) {
    const int64_t t0 = offsets[b];
    const int64_t len = offsets[b + 1] - t0;
    float* q = a.q.data() + t0 * q_dim;
    float* k = a.k.data() + t0 * kv_dim;
    const float* v = a.v.data() + t0 * kv_dim;
    float* out = a.heads_out.data() + t0 * q_dim;
    float* lse = a.lse.data() + t0 * c.num_attention_heads;
    // Positions continue from what the cache holds: a decode query is not at position 0.
    const int64_t position = caches.empty() ? 0 : caches[b]->length();
    rope_forward(q, len, c.num_attention_heads, c.head_dim, position, m.rope);
    rope_forward(k, len, c.num_key_value_heads, c.head_dim, position, m.rope);
    round_activations(k, len * kv_dim, m.activations);  // as the KV cache holds k
    if (caches.empty()) {
      AttentionDims dims = sequence_dims(c, l, len);
      dims.activations = m.activations;
      attention_forward(out, lse, q, k, v, sinks, dims);
      continue;
    }
    KvCache& cache = *caches[b];
    cache.append(l, k, v, len);
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
    dims.activations = m.activations;
    attention_forward(out, lse, q, kv.k.data(), kv.v.data(), sinks, dims);
  }
  round_activations(a.heads_out.data(), n * q_dim, m.activations);
  std::vector<float> o(size_t(n * h));
  linear_forward(o.data(), a.heads_out.data(), w.o_proj, bias_or_null(w.o_bias), n);
  if (ad) lora_forward(o.data(), a.heads_out.data(), nullptr, n, ad->o_proj);
  for (int64_t i = 0; i < n * h; ++i) x[i] += o[size_t(i)];
}

void attention_block_backward(float* dx, const ModelRef& m, int l, std::span<const int32_t> offsets,
                              const LayerAdapters* ad, const AttentionActivations& a) {
  const GptOssConfig& c = m.config;
  const LayerWeights& lw = m.weights.layers[size_t(l)];
  const AttentionWeights& w = lw.attn;
  const int64_t n = offsets.back();
  const int64_t h = c.hidden_size;
  const int64_t q_dim = int64_t(c.num_attention_heads) * c.head_dim;
  const int64_t kv_dim = int64_t(c.num_key_value_heads) * c.head_dim;

  // dx is d(block output); the residual passes it through unchanged, o_proj takes it too.
  std::vector<float> dheads(size_t(n * q_dim), 0.0f);
  linear_backward_input(dheads.data(), dx, w.o_proj, n);
  if (ad) lora_backward(dheads.data(), dx, a.heads_out.data(), nullptr, n, ad->o_proj);

  const float* sinks = ad && ad->sinks ? ad->sinks : w.sinks.data();
  float* dsinks = ad && ad->sinks ? ad->grad_sinks : nullptr;
  std::vector<float> dq(size_t(n * q_dim), 0.0f), dk(size_t(n * kv_dim), 0.0f), dv(size_t(n * kv_dim), 0.0f);
  for (size_t b = 0; b + 1 < offsets.size(); ++b) {
    const int64_t t0 = offsets[b];
    const int64_t len = offsets[b + 1] - t0;
    attention_backward(dq.data() + t0 * q_dim, dk.data() + t0 * kv_dim, dv.data() + t0 * kv_dim, dsinks,
                       dheads.data() + t0 * q_dim, a.q.data() + t0 * q_dim, a.k.data() + t0 * kv_dim,
                       a.v.data() + t0 * kv_dim, sinks, a.heads_out.data() + t0 * q_dim,
                       a.lse.data() + t0 * c.num_attention_heads, sequence_dims(c, l, len));
    rope_backward(dq.data() + t0 * q_dim, len, c.num_attention_heads, c.head_dim, 0, m.rope);
    rope_backward(dk.data() + t0 * kv_dim, len, c.num_key_value_heads, c.head_dim, 0, m.rope);
  }

  std::vector<float> dxn(size_t(n * h), 0.0f);
  linear_backward_input(dxn.data(), dq.data(), w.q_proj, n);
  linear_backward_input(dxn.data(), dk.data(), w.k_proj, n);
  linear_backward_input(dxn.data(), dv.data(), w.v_proj, n);
  if (ad) {
    lora_backward(dxn.data(), dq.data(), a.xn.data(), nullptr, n, ad->q_proj);
    lora_backward(dxn.data(), dk.data(), a.xn.data(), nullptr, n, ad->k_proj);
    lora_backward(dxn.data(), dv.data(), a.xn.data(), nullptr, n, ad->v_proj);
  }
  rmsnorm_backward(dx, nullptr, dxn.data(), a.x.data(), lw.input_layernorm.data(), a.rstd.data(), n, h);
}

void moe_block_forward(float* x, const ModelRef& m, int l, int64_t n, const LayerAdapters* ad,
                       MoeBlockActivations* saved) {
  const GptOssConfig& c = m.config;
  const LayerWeights& w = m.weights.layers[size_t(l)];
  const int64_t h = c.hidden_size;
  MoeBlockActivations local;
  MoeBlockActivations& a = saved ? *saved : local;
  if (saved) a.x.assign(x, x + n * h);
  a.rstd.resize(size_t(n));
  a.xn.resize(size_t(n * h));
  rmsnorm_forward(a.xn.data(), a.rstd.data(), x, w.post_attention_layernorm.data(), n, h, float(c.rms_norm_eps));
  round_activations(a.xn.data(), n * h, m.activations);
  std::vector<float> out(size_t(n * h));
  moe_forward(out.data(), &a.moe, a.xn.data(), n, w.mlp, moe_dims(m), ad, saved != nullptr);
  for (int64_t i = 0; i < n * h; ++i) x[i] += out[size_t(i)];
}

void moe_block_backward(float* dx, const ModelRef& m, int l, int64_t n, const LayerAdapters* ad,
                        const MoeBlockActivations& a) {
  const GptOssConfig& c = m.config;
  const LayerWeights& w = m.weights.layers[size_t(l)];
  const int64_t h = c.hidden_size;
  std::vector<float> dxn(size_t(n * h), 0.0f);
  moe_backward(dxn.data(), dx, a.xn.data(), n, w.mlp, moe_dims(m), ad, a.moe);
  rmsnorm_backward(dx, nullptr, dxn.data(), a.x.data(), w.post_attention_layernorm.data(), a.rstd.data(), n, h);
}

std::vector<float> decoder_forward(const ModelRef& m, std::span<const int32_t> tokens,
                                   std::span<const int32_t> offsets, std::span<KvCache* const> caches,
                                   std::span<const LayerAdapters* const> adapters,
                                   DecoderActivations* saved, bool recompute) {
  const GptOssConfig& c = m.config;
  check_batch(tokens, offsets, caches.size());
  OSSRL_CHECK(adapters.empty() || adapters.size() == size_t(c.num_hidden_layers),
              "decoder: {} layer adapters for {} layers", adapters.size(), c.num_hidden_layers);
  OSSRL_CHECK(!saved || caches.empty(), "decoder: activations are kept only for whole sequences");
  OSSRL_CHECK(!saved || m.activations == Activations::Fp32,
              "decoder: bf16 activations are for inference; backward needs the fp32 forward");
  const int64_t n = int64_t(tokens.size());
  const int64_t h = c.hidden_size;
  std::vector<float> x(size_t(n * h));
  embedding_forward(x.data(), tokens.data(), n, m.weights.embed_tokens);
  if (saved) {
    saved->recompute = recompute;
    saved->attention.assign(size_t(c.num_hidden_layers), {});
    saved->moe.assign(size_t(c.num_hidden_layers), {});
  }
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerAdapters* ad = adapters.empty() ? nullptr : adapters[size_t(l)];
    if (saved && recompute) {
      saved->attention[size_t(l)].x.assign(x.begin(), x.end());
      attention_block_forward(x.data(), m, l, offsets, caches, ad, nullptr);
      saved->moe[size_t(l)].x.assign(x.begin(), x.end());
      moe_block_forward(x.data(), m, l, n, ad, nullptr);
    } else {
      attention_block_forward(x.data(), m, l, offsets, caches, ad, saved ? &saved->attention[size_t(l)] : nullptr);
      moe_block_forward(x.data(), m, l, n, ad, saved ? &saved->moe[size_t(l)] : nullptr);
    }
  }
  for (size_t b = 0; b < caches.size(); ++b) caches[b]->commit(offsets[b + 1] - offsets[b]);
  if (saved) {
    saved->final_x = x;
    saved->final_rstd.resize(size_t(n));
  }
  rmsnorm_forward(x.data(), saved ? saved->final_rstd.data() : nullptr, x.data(), m.weights.norm.data(), n, h,
                  float(c.rms_norm_eps));
  round_activations(x.data(), n * h, m.activations);  // lm_head's input
  return x;
}

void decoder_backward(const float* dhidden, const ModelRef& m, std::span<const int32_t> offsets,
                      std::span<const LayerAdapters* const> adapters, DecoderActivations& saved) {
  const GptOssConfig& c = m.config;
  const int64_t n = offsets.back();
  const int64_t h = c.hidden_size;
  OSSRL_CHECK(saved.attention.size() == size_t(c.num_hidden_layers) && saved.final_x.size() == size_t(n * h),
              "decoder backward: no activations kept for this batch");
  std::vector<float> dx(size_t(n * h), 0.0f);
  rmsnorm_backward(dx.data(), nullptr, dhidden, saved.final_x.data(), m.weights.norm.data(),
                   saved.final_rstd.data(), n, h);
  for (int l = c.num_hidden_layers - 1; l >= 0; --l) {
    const LayerAdapters* ad = adapters.empty() ? nullptr : adapters[size_t(l)];
    MoeBlockActivations& moe = saved.moe[size_t(l)];
    if (saved.recompute) {
      // Rebuild this block's activations from its input; routing and dropout masks are
      // deterministic, so they are the forward's.
      std::vector<float> x = moe.x;
      moe_block_forward(x.data(), m, l, n, ad, &moe);
    }
    moe_block_backward(dx.data(), m, l, n, ad, moe);
    moe = {};
    AttentionActivations& attn = saved.attention[size_t(l)];
    if (saved.recompute) {
      std::vector<float> x = attn.x;
      attention_block_forward(x.data(), m, l, offsets, {}, ad, &attn);
    }
    attention_block_backward(dx.data(), m, l, offsets, ad, attn);
    attn = {};
  }
}

}  // namespace ossrl
