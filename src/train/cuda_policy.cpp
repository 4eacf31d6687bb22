#include "train/cuda_policy.h"

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "cuda/adamw.h"
#include "cuda/embedding.h"
#include "cuda/flash_attention.h"
#include "cuda/linear.h"
#include "cuda/logprobs.h"
#include "cuda/lora.h"
#include "cuda/moe_train.h"
#include "cuda/rmsnorm.h"
#include "cuda/rope.h"

namespace ossrl {

namespace {

using bf16 = __nv_bfloat16;
using cuda::DeviceBuffer;

// Without recomputation a layer's MoE activations are kept whole: one chunk of every token.
int moe_chunk_tokens(const CudaPolicyOptions& o) {
  return o.recompute_activations ? std::min(o.moe_chunk_tokens, o.max_tokens) : o.max_tokens;
}

// One layer's attention-block activations for up to T tokens: what the forward leaves and the
// backward reads. Also, without recomputation, each layer's MoE-block input (x_mid) and MoE
// activations.
struct AttentionBuffers {
  DeviceBuffer<bf16> xn;             // [T, H] input_layernorm's output
  DeviceBuffer<float> q;             // [T, heads, head_dim] after RoPE
  DeviceBuffer<bf16> k, v;           // [T, kv_heads, head_dim]
  DeviceBuffer<bf16> out;            // [T, q_dim] attention output, o_proj's input
  DeviceBuffer<float> lse;           // [T, heads]
  DeviceBuffer<bf16> u_q, u_k, u_v, u_o;  // [T, r] LoRA's x · Aᵀ

  AttentionBuffers() = default;
  AttentionBuffers(Allocator& a, const GptOssConfig& c, int r, int max_tokens) {
    const size_t t = size_t(max_tokens), h = size_t(c.hidden_size);
    const size_t q_dim = size_t(c.num_attention_heads) * size_t(c.head_dim);
    const size_t kv_dim = size_t(c.num_key_value_heads) * size_t(c.head_dim);
    xn = a.take<bf16>(t * h, "normed activations");
    q = a.take<float>(t * q_dim, "rotated queries");
    k = a.take<bf16>(t * kv_dim, "rotated keys");
    v = a.take<bf16>(t * kv_dim, "values");
    out = a.take<bf16>(t * q_dim, "attention output");
    lse = a.take<float>(t * size_t(c.num_attention_heads), "attention log-sum-exp");
    for (DeviceBuffer<bf16>* u : {&u_q, &u_k, &u_v, &u_o}) *u = a.take<bf16>(t * size_t(r), "LoRA activations");
  }
};

// A layer's activations kept by the forward when the backward does not recompute.
struct KeptLayer {
  AttentionBuffers attention;
  DeviceBuffer<float> x_mid;  // [T, H] the MoE block's input (residual after attention)
  std::unique_ptr<cuda::MoeTrainActivations> moe;
};

// The policy's device arrays for steps of up to T tokens; built with a counting Allocator
// it only adds up their bytes (the memory plan). L layers, H hidden, r the LoRA rank.
struct PolicyBuffers {
  // The step's inputs.
  DeviceBuffer<int32_t> tokens, positions, kv_slots;  // [T]
  DeviceBuffer<int32_t> seq_offsets;                  // [T + 1]
  DeviceBuffer<int32_t> score_rows, targets;          // [T] rows of the final norm that predict a scored token
  // Kept by forward for backward: each layer's input, and the final norm's input at [L].
  DeviceBuffer<float> layer_inputs;  // [L + 1, T, H]
  // One layer's working set (forward, or recomputed in backward).
  DeviceBuffer<float> x;             // [T, H] the residual stream
  DeviceBuffer<bf16> xn_moe;         // [T, H] post_attention_layernorm's output
  DeviceBuffer<float> qkv;           // [T, qkv_dim] the fused projection; dqkv in backward
  DeviceBuffer<bf16> qkv16;          // [T, qkv_dim] dqkv in bf16 (the dX GEMM's input)
  AttentionBuffers attention;    // the attention block's, when recomputed
  DeviceBuffer<bf16> lora_v;         // [T, r] LoRA backward's intermediate
  DeviceBuffer<bf16> final_normed;   // [T, H] the scored rows, normed
  DeviceBuffer<float> logp, lse, entropy, dlogp;  // [T]
  // Backward.
  DeviceBuffer<float> dres;          // [T, H] dL/d(residual)
  DeviceBuffer<float> dy;            // [T, H] dL/d(a norm's output); the lm_head's dhidden rows
  DeviceBuffer<float> dhidden;       // [T, H] the lm_head's dhidden, compact
  DeviceBuffer<bf16> dres16;         // [T, H]
  DeviceBuffer<float> dattn, dq;     // [T, q_dim]
  DeviceBuffer<float> dk, dv;        // [T, kv_dim]
  DeviceBuffer<float> attn_scratch;  // [T, heads]
  DeviceBuffer<float> moe_sink;      // [moe chunk, H] the recomputed MoE output nobody reads

  PolicyBuffers() = default;
  PolicyBuffers(Allocator& a, const GptOssConfig& c, int r, const CudaPolicyOptions& o) {
    const size_t t = size_t(o.max_tokens), h = size_t(c.hidden_size), layers = size_t(c.num_hidden_layers);
    const size_t q_dim = size_t(c.num_attention_heads) * size_t(c.head_dim);
    const size_t kv_dim = size_t(c.num_key_value_heads) * size_t(c.head_dim);
    const size_t qkv_dim = q_dim + 2 * kv_dim, heads = size_t(c.num_attention_heads);
    tokens = a.take<int32_t>(t, "policy tokens");
    positions = a.take<int32_t>(t, "policy positions");
    kv_slots = a.take<int32_t>(t, "policy rows");
    seq_offsets = a.take<int32_t>(t + 1, "policy sequence offsets");
    score_rows = a.take<int32_t>(t, "policy scored rows");
    targets = a.take<int32_t>(t, "policy targets");
    layer_inputs = a.take<float>((layers + 1) * t * h, "layer inputs (activation checkpoints)");
    x = a.take<float>(t * h, "residual stream");
    xn_moe = a.take<bf16>(t * h, "normed activations");
    qkv = a.take<float>(t * qkv_dim, "qkv activations");
    qkv16 = a.take<bf16>(t * qkv_dim, "qkv gradient");
    attention = AttentionBuffers(a, c, r, o.max_tokens);
    lora_v = a.take<bf16>(t * size_t(r), "LoRA activations");
    final_normed = a.take<bf16>(t * h, "final normed rows");
    for (DeviceBuffer<float>* s : {&logp, &lse, &entropy, &dlogp}) *s = a.take<float>(t, "per-token log-probs");
    dres = a.take<float>(t * h, "residual gradient");
    dy = a.take<float>(t * h, "norm output gradient");
    dhidden = a.take<float>(t * h, "lm_head input gradient");
    dres16 = a.take<bf16>(t * h, "residual gradient (bf16)");
    dattn = a.take<float>(t * q_dim, "attention output gradient");
    dq = a.take<float>(t * q_dim, "query gradient");
    dk = a.take<float>(t * kv_dim, "key gradient");
    dv = a.take<float>(t * kv_dim, "value gradient");
    attn_scratch = a.take<float>(t * heads, "attention backward scratch");
    moe_sink = a.take<float>(o.recompute_activations ? size_t(moe_chunk_tokens(o)) * h : 0, "recomputed MoE output");
  }
};

// bf16 experts need no decode stage.
cuda::MoeTrainDims moe_dims(const GptOssConfig& c, int r, const CudaPolicyOptions& o, bool mxfp4) {
  return cuda::MoeTrainDims{c.hidden_size, c.intermediate_size, c.num_local_experts, c.experts_per_token,
                            float(c.swiglu_limit), r, mxfp4 ? o.moe_stage_bytes : 0};
}


int lora_rank(const DeviceLora* lora) { return lora == nullptr ? 0 : lora->config().r; }

// Maximal runs of consecutive rows: [first destination row, first source row, length].
struct RowRun {
  int dst, src, count;
};

}  // namespace

struct CudaPolicy::Impl {
  const CudaModel& model;
  const DeviceWeights& w;
  const GptOssConfig& c;
  DeviceLora* lora;
  CudaPolicyOptions options;
  PolicyBuffers b;
  cuda::Blas blas{nullptr};
  cuda::MoeTrainBlock moe;
  cuda::LmHeadLogprobs lm_head;
  std::vector<KeptLayer> kept;  // [layers] without recomputation, else empty

  // The last forward with keep_activations, for backward.
  struct Saved {
    bool valid = false;
    bool adapters = false;
    int n = 0;
    std::vector<int32_t> tokens, positions, offsets, rows, targets, scored;  // scored: token index of each row
    std::vector<float> lse;
  } saved;

  Impl(const CudaModel& m, DeviceLora* l, const CudaPolicyOptions& o)
      : model(m),
        w(m.weights()),
        c(m.config()),
        lora(l),
        options(o),
        moe(moe_dims(m.config(), lora_rank(l), o, m.weights().mxfp4_experts()), moe_chunk_tokens(o)),
        lm_head(o.max_tokens, m.config().hidden_size, m.config().vocab_size, o.lm_head_workspace) {
    Allocator a;
    b = PolicyBuffers(a, c, lora_rank(l), o);
    if (!o.recompute_activations) {
      kept.resize(size_t(c.num_hidden_layers));
      for (KeptLayer& k : kept) {
        k.attention = AttentionBuffers(a, c, lora_rank(l), o.max_tokens);
        k.x_mid = a.take<float>(size_t(o.max_tokens) * size_t(c.hidden_size), "MoE block inputs");
        k.moe = std::make_unique<cuda::MoeTrainActivations>(moe_dims(c, lora_rank(l), o, w.mxfp4_experts()),
                                                            o.max_tokens);
      }
    }
  }

  int hidden() const { return c.hidden_size; }
  int q_dim() const { return c.num_attention_heads * c.head_dim; }
  int kv_dim() const { return c.num_key_value_heads * c.head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  float eps() const { return float(c.rms_norm_eps); }
  float* layer_input(int l) { return b.layer_inputs.data() + size_t(l) * size_t(options.max_tokens) * size_t(hidden()); }

  // Uploads a step's index arrays (host vectors of the same step) to the device.
  void upload_step(const Saved& s) {
    b.tokens.upload(s.tokens);
    b.positions.upload(s.positions);
    std::vector<int32_t> slots(size_t(s.n));
    for (int i = 0; i < s.n; ++i) slots[size_t(i)] = i;
    b.kv_slots.upload(slots);
    b.seq_offsets.upload(s.offsets);
    b.score_rows.upload(s.rows);
    b.targets.upload(s.targets);
  }

  cuda::FlashAttentionShape attention_shape(const Saved& s, int l) const {
    int longest = 0;
    for (size_t i = 0; i + 1 < s.offsets.size(); ++i) longest = std::max(longest, s.offsets[i + 1] - s.offsets[i]);
    return cuda::FlashAttentionShape{.seq_offsets = b.seq_offsets.data(),
                                     .n_seqs = int(s.offsets.size()) - 1,
                                     .n_tokens = s.n,
                                     .max_seq_len = longest,
                                     .heads = c.num_attention_heads,
                                     .kv_heads = c.num_key_value_heads,
                                     .head_dim = c.head_dim,
                                     .sliding_window = w.layers[size_t(l)].sliding_window};
  }

  cuda::MoeTrainWeights moe_weights(int l) const {
    const DeviceLayer& layer = w.layers[size_t(l)];
    return cuda::MoeTrainWeights{layer.router.data(), layer.router_bias.data(), layer.gate_up.view(),
                                 layer.down.view()};
  }

  const float* sinks(int l, const cuda::DeviceLayerAdapters* ad) const {
    return ad != nullptr && ad->sinks != nullptr ? ad->sinks : w.layers[size_t(l)].sinks.data();
  }

  // x [n, H] += attention(input_layernorm(x)) for layer l, leaving in `a` what
  // attention_backward needs.
  void attention_forward(int l, const Saved& s, const cuda::DeviceLayerAdapters* ad, AttentionBuffers& a) {
    const DeviceLayer& layer = w.layers[size_t(l)];
    const int n = s.n, h = hidden();
    cuda::rmsnorm_forward(a.xn.data(), b.x.data(), layer.input_layernorm.data(), nullptr, n, h, eps(), nullptr);
    cuda::linear_forward(blas, b.qkv.data(), a.xn.data(), layer.qkv.data(), layer.qkv_bias.data(), n, h, qkv_dim(),
                         false);
    if (ad != nullptr) {
      cuda::lora_forward(blas, b.qkv.data(), qkv_dim(), a.xn.data(), n, ad->q_proj, a.u_q.data());
      cuda::lora_forward(blas, b.qkv.data() + q_dim(), qkv_dim(), a.xn.data(), n, ad->k_proj, a.u_k.data());
      cuda::lora_forward(blas, b.qkv.data() + q_dim() + kv_dim(), qkv_dim(), a.xn.data(), n, ad->v_proj,
                         a.u_v.data());
    }
    // RoPE writes k and v as a "cache" whose slot i is token i.
    cuda::rope_qkv_forward(a.q.data(), a.k.data(), a.v.data(), b.qkv.data(), b.positions.data(), b.kv_slots.data(),
                           w.inv_freq.data(), w.attention_scaling, n, c.num_attention_heads, c.num_key_value_heads,
                           c.head_dim, nullptr);
    cuda::flash_attention_forward(a.out.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(), sinks(l, ad),
                                  attention_shape(s, l), nullptr);
    cuda::linear_forward(blas, b.x.data(), a.out.data(), layer.o_proj.data(), layer.o_bias.data(), n, q_dim(), h,
                         true);
    if (ad != nullptr) cuda::lora_forward(blas, b.x.data(), h, a.out.data(), n, ad->o_proj, a.u_o.data());
  }

  // x [n, H] += moe(post_attention_layernorm(x)) for layer l; its activations go to `keep`
  // (one chunk of every token) or nowhere that outlives the next call.
  void moe_forward(int l, int n, const cuda::DeviceLayerAdapters* ad, cuda::MoeTrainActivations* keep) {
    const int h = hidden();
    cuda::rmsnorm_forward(b.xn_moe.data(), b.x.data(), w.layers[size_t(l)].post_attention_layernorm.data(), nullptr,
                          n, h, eps(), nullptr);
    for (int first = 0; first < n; first += moe_chunk()) {
      const int count = std::min(moe_chunk(), n - first);
      moe.forward(blas, b.x.data() + size_t(first) * size_t(h), b.xn_moe.data() + size_t(first) * size_t(h), count,
                  moe_weights(l), ad ? &ad->gate_up_proj : nullptr, ad ? &ad->down_proj : nullptr, keep);
    }
  }
  int moe_chunk() const { return moe_chunk_tokens(options); }

  // Given dres = dL/d(layer output) for layer l, whose input is layer_input(l): leaves dres =
  // dL/d(layer input), accumulating the adapters' grads. Recomputes the layer's activations,
  // or reads the ones the forward kept.
  void layer_backward(int l, const Saved& s, const cuda::DeviceLayerAdapters* ad) {
    const DeviceLayer& layer = w.layers[size_t(l)];
    const int n = s.n, h = hidden();
    const size_t nh = size_t(n) * size_t(h);
    const cuda::DeviceAdapter* gate_up = ad ? &ad->gate_up_proj : nullptr;
    const cuda::DeviceAdapter* down = ad ? &ad->down_proj : nullptr;
    AttentionBuffers& a = kept.empty() ? b.attention : kept[size_t(l)].attention;
    const float* x_mid = b.x.data();
    if (kept.empty()) {
      OSSRL_CUDA_CHECK(cudaMemcpyAsync(b.x.data(), layer_input(l), nh * sizeof(float), cudaMemcpyDeviceToDevice));
      attention_forward(l, s, ad, a);  // b.x is now the MoE block's input
      // The MoE block a chunk of tokens at a time: recompute its activations, then backward.
      cuda::rmsnorm_forward(b.xn_moe.data(), b.x.data(), layer.post_attention_layernorm.data(), nullptr, n, h, eps(),
                            nullptr);
      for (int first = 0; first < n; first += moe_chunk()) {
        const int count = std::min(moe_chunk(), n - first);
        const size_t at = size_t(first) * size_t(h);
        moe.forward(blas, b.moe_sink.data(), b.xn_moe.data() + at, count, moe_weights(l), gate_up, down);
        moe.backward(blas, b.dy.data() + at, b.dres.data() + at, b.xn_moe.data() + at, count, moe_weights(l), gate_up,
                     down);
      }
    } else {
      KeptLayer& k = kept[size_t(l)];
      x_mid = k.x_mid.data();
      moe.backward(blas, b.dy.data(), b.dres.data(), b.xn_moe.data(), n, moe_weights(l), gate_up, down, k.moe.get());
    }
    cuda::rmsnorm_backward(b.dres.data(), b.dy.data(), x_mid, layer.post_attention_layernorm.data(), n, h, eps(),
                           nullptr);

    // Attention block: o_proj, attention, RoPE, qkv, input_layernorm.
    cuda::to_bf16(b.dres16.data(), b.dres.data(), nh, nullptr);
    cuda::linear_backward_input(blas, b.dattn.data(), b.dres16.data(), layer.o_proj.data(), n, q_dim(), h, false);
    if (ad != nullptr) {
      cuda::lora_backward(blas, b.dattn.data(), b.dres16.data(), h, a.out.data(), a.u_o.data(), n, ad->o_proj,
                          b.lora_v.data());
    }
    cuda::flash_attention_backward(b.dq.data(), b.dk.data(), b.dv.data(), ad ? ad->grad_sinks : nullptr,
                                   b.attn_scratch.data(), b.dattn.data(), a.q.data(), a.k.data(), a.v.data(),
                                   sinks(l, ad), a.out.data(), a.lse.data(), attention_shape(s, l), nullptr);
    float* dqkv = b.qkv.data();  // the projection's output is not needed any more
    cuda::rope_qkv_backward(dqkv, b.dq.data(), b.dk.data(), b.dv.data(), b.positions.data(), w.inv_freq.data(),
                            w.attention_scaling, n, c.num_attention_heads, c.num_key_value_heads, c.head_dim, nullptr);
    cuda::to_bf16(b.qkv16.data(), dqkv, size_t(n) * size_t(qkv_dim()), nullptr);
    cuda::linear_backward_input(blas, b.dy.data(), b.qkv16.data(), layer.qkv.data(), n, h, qkv_dim(), false);
    if (ad != nullptr) {
      const bf16* dqkv16 = b.qkv16.data();
      cuda::lora_backward(blas, b.dy.data(), dqkv16, qkv_dim(), a.xn.data(), a.u_q.data(), n, ad->q_proj,
                          b.lora_v.data());
      cuda::lora_backward(blas, b.dy.data(), dqkv16 + q_dim(), qkv_dim(), a.xn.data(), a.u_k.data(), n,
                          ad->k_proj, b.lora_v.data());
      cuda::lora_backward(blas, b.dy.data(), dqkv16 + q_dim() + kv_dim(), qkv_dim(), a.xn.data(), a.u_v.data(),
                          n, ad->v_proj, b.lora_v.data());
    }
    cuda::rmsnorm_backward(b.dres.data(), b.dy.data(), layer_input(l), layer.input_layernorm.data(), n, h, eps(),
                           nullptr);
  }

  // The runs of consecutive scored rows, for moving the lm_head's compact rows to and from
  // their places among all tokens.
  static std::vector<RowRun> row_runs(const std::vector<int32_t>& rows) {
    std::vector<RowRun> runs;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (!runs.empty() && runs.back().dst + runs.back().count == rows[i]) {
        ++runs.back().count;
      } else {
        runs.push_back(RowRun{rows[i], int(i), 1});
      }
    }
    return runs;
  }
};

CudaPolicy::CudaPolicy(const CudaModel& model, DeviceLora* lora, const CudaPolicyOptions& options) {
  OSSRL_CHECK(options.max_tokens > 0 && options.moe_chunk_tokens > 0,
              "CUDA policy: max_tokens ({}) and moe_chunk_tokens ({}) must be positive", options.max_tokens,
              options.moe_chunk_tokens);
  const size_t needed = bytes(model.config(), lora_rank(lora), model.weights().mxfp4_experts(), options);
  size_t free_bytes = 0, total_bytes = 0;
  OSSRL_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  OSSRL_CHECK(needed <= free_bytes,
              "CUDA policy: training steps of {} tokens need {:.2f} GiB of activations and workspace, but only "
              "{:.2f} GiB of {:.2f} GiB is free; lower the tokens per micro-batch",
              options.max_tokens, double(needed) / double(1 << 30), double(free_bytes) / double(1 << 30),
              double(total_bytes) / double(1 << 30));
  impl_ = std::make_unique<Impl>(model, lora, options);
}

CudaPolicy::~CudaPolicy() = default;

void CudaPolicy::zero_grad() {
  if (impl_->lora != nullptr) impl_->lora->zero_grad(nullptr);
}

size_t CudaPolicy::bytes(const GptOssConfig& config, int lora_r, bool mxfp4, const CudaPolicyOptions& options) {
  Allocator counter(/*count_only=*/true);
  [[maybe_unused]] const PolicyBuffers counted(counter, config, lora_r, options);
  size_t kept = 0;
  if (!options.recompute_activations) {  // one layer's kept activations, times the layers
    Allocator layer(/*count_only=*/true);
    [[maybe_unused]] const AttentionBuffers attention(layer, config, lora_r, options.max_tokens);
    (void)layer.take<float>(size_t(options.max_tokens) * size_t(config.hidden_size), "MoE block inputs");
    kept = size_t(config.num_hidden_layers) *
           (layer.bytes() + cuda::MoeTrainActivations::bytes(moe_dims(config, lora_r, options, mxfp4), options.max_tokens));
  }
  return counter.bytes() + kept + cuda::MoeTrainBlock::bytes(moe_dims(config, lora_r, options, mxfp4),
                                                             moe_chunk_tokens(options)) +
         options.lm_head_workspace;
}

size_t CudaPolicy::bytes() const {
  return bytes(impl_->c, lora_rank(impl_->lora), impl_->w.mxfp4_experts(), impl_->options);
}

PolicyOutput CudaPolicy::forward(std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                                 const PolicyForward& options) {
  Impl& m = *impl_;
  const int n = int(tokens.size());
  OSSRL_CHECK(n <= m.options.max_tokens, "CUDA policy: a forward of {} tokens exceeds max_tokens {}", n,
              m.options.max_tokens);
  OSSRL_CHECK(offsets.size() >= 2 && offsets.front() == 0 && offsets.back() == n,
              "CUDA policy: offsets must run from 0 to the {} tokens", n);
  OSSRL_CHECK(options.score_mask.empty() || options.score_mask.size() == tokens.size(),
              "CUDA policy: score_mask has {} entries for {} tokens", options.score_mask.size(), n);
  Impl::Saved s;
  s.n = n;
  s.tokens.assign(tokens.begin(), tokens.end());
  s.offsets.assign(offsets.begin(), offsets.end());
  s.positions.resize(size_t(n));
  for (size_t q = 0; q + 1 < offsets.size(); ++q) {
    OSSRL_CHECK(offsets[q] < offsets[q + 1], "CUDA policy: sequence {} is empty", q);
    for (int t = offsets[q]; t < offsets[q + 1]; ++t) {
      OSSRL_CHECK(tokens[size_t(t)] >= 0 && tokens[size_t(t)] < m.c.vocab_size,
                  "CUDA policy: token {} at {} is outside the vocabulary of {}", tokens[size_t(t)], t, m.c.vocab_size);
      s.positions[size_t(t)] = t - offsets[q];
      const bool wanted = options.score_mask.empty() || options.score_mask[size_t(t)] != 0;
      if (t > offsets[q] && wanted) {
        s.rows.push_back(t - 1);
        s.targets.push_back(tokens[size_t(t)]);
        s.scored.push_back(t);
      }
    }
  }
  m.upload_step(s);
  const bool adapters = m.lora != nullptr && adapters_enabled_;
  auto layer_adapters = [&](int l) { return adapters ? &m.lora->layers()[size_t(l)] : nullptr; };

  const size_t nh = size_t(n) * size_t(m.hidden());
  cuda::embedding_forward(m.b.x.data(), m.w.embedding_table(), m.b.tokens.data(), n, m.hidden(), nullptr);
  for (int l = 0; l < m.c.num_hidden_layers; ++l) {
    if (options.keep_activations) {
      OSSRL_CUDA_CHECK(
          cudaMemcpyAsync(m.layer_input(l), m.b.x.data(), nh * sizeof(float), cudaMemcpyDeviceToDevice));
    }
    // Without recomputation a kept forward leaves each layer's activations in its own buffers.
    KeptLayer* k = options.keep_activations && !m.kept.empty() ? &m.kept[size_t(l)] : nullptr;
    m.attention_forward(l, s, layer_adapters(l), k ? k->attention : m.b.attention);
    if (k) OSSRL_CUDA_CHECK(cudaMemcpyAsync(k->x_mid.data(), m.b.x.data(), nh * sizeof(float), cudaMemcpyDeviceToDevice));
    m.moe_forward(l, n, layer_adapters(l), k ? k->moe.get() : nullptr);
  }
  const int scored = int(s.rows.size());
  if (options.keep_activations) {
    OSSRL_CUDA_CHECK(cudaMemcpyAsync(m.layer_input(m.c.num_hidden_layers), m.b.x.data(), nh * sizeof(float),
                                     cudaMemcpyDeviceToDevice));
  }
  PolicyOutput out;
  out.log_probs.assign(size_t(n), 0.0f);
  if (options.entropy) out.entropy.assign(size_t(n), 0.0f);
  s.lse.resize(size_t(scored));
  if (scored > 0) {
    cuda::rmsnorm_forward(m.b.final_normed.data(), m.b.x.data(), m.w.norm.data(), m.b.score_rows.data(), scored,
                          m.hidden(), m.eps(), nullptr);
    m.lm_head.forward(m.blas, m.b.logp.data(), m.b.lse.data(), options.entropy ? m.b.entropy.data() : nullptr,
                      m.b.final_normed.data(), m.w.lm_head_weight(), m.b.targets.data(), scored);
    const std::vector<float> logp = m.b.logp.download(size_t(scored));
    s.lse = m.b.lse.download(size_t(scored));
    for (int i = 0; i < scored; ++i) out.log_probs[size_t(s.scored[size_t(i)])] = logp[size_t(i)];
    if (options.entropy) {
      const std::vector<float> entropy = m.b.entropy.download(size_t(scored));
      for (int i = 0; i < scored; ++i) out.entropy[size_t(s.scored[size_t(i)])] = entropy[size_t(i)];
    }
  }
  OSSRL_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  if (options.keep_activations) {
    s.valid = true;
    s.adapters = adapters;
    m.saved = std::move(s);
  }
  return out;
}

void CudaPolicy::backward(std::span<const float> dlogp) {
  Impl& m = *impl_;
  Impl::Saved& s = m.saved;
  OSSRL_CHECK(s.valid, "CudaPolicy::backward needs a forward with keep_activations first");
  OSSRL_CHECK(dlogp.size() == size_t(s.n), "CudaPolicy::backward: {} gradients for {} tokens", dlogp.size(), s.n);
  OSSRL_CHECK(!s.adapters || adapters_enabled_, "CudaPolicy::backward: adapters were switched off after the forward");
  const int n = s.n, h = m.hidden(), scored = int(s.rows.size());
  const size_t nh = size_t(n) * size_t(h);
  // A forward without keep_activations may have run since: restore this step's arrays.
  m.upload_step(s);
  OSSRL_CUDA_CHECK(cudaMemsetAsync(m.b.dres.data(), 0, nh * sizeof(float)));
  if (scored > 0) {
    std::vector<float> row_dlogp(static_cast<size_t>(scored));
    for (int i = 0; i < scored; ++i) row_dlogp[size_t(i)] = dlogp[size_t(s.scored[size_t(i)])];
    m.b.dlogp.upload(row_dlogp);
    m.b.lse.upload(s.lse);
    const float* final_x = m.layer_input(m.c.num_hidden_layers);
    cuda::rmsnorm_forward(m.b.final_normed.data(), final_x, m.w.norm.data(), m.b.score_rows.data(), scored, h,
                          m.eps(), nullptr);
    m.lm_head.backward(m.blas, m.b.dhidden.data(), m.b.dlogp.data(), m.b.final_normed.data(), m.w.lm_head_weight(),
                       m.b.targets.data(), m.b.lse.data(), scored);
    // dL/d(final norm output) at every token: the scored rows' dhidden, zero elsewhere.
    OSSRL_CUDA_CHECK(cudaMemsetAsync(m.b.dy.data(), 0, nh * sizeof(float)));
    for (const RowRun& run : Impl::row_runs(s.rows)) {
      OSSRL_CUDA_CHECK(cudaMemcpyAsync(m.b.dy.data() + size_t(run.dst) * size_t(h),
                                       m.b.dhidden.data() + size_t(run.src) * size_t(h),
                                       size_t(run.count) * size_t(h) * sizeof(float), cudaMemcpyDeviceToDevice));
    }
    cuda::rmsnorm_backward(m.b.dres.data(), m.b.dy.data(), final_x, m.w.norm.data(), n, h, m.eps(), nullptr);
  }
  for (int l = m.c.num_hidden_layers - 1; l >= 0; --l) {
    m.layer_backward(l, s, s.adapters ? &m.lora->layers()[size_t(l)] : nullptr);
    if (s.adapters) m.lora->layer_done(l, nullptr);
  }
  OSSRL_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  s = {};
}

}  // namespace ossrl
