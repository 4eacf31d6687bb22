// gpt-oss's weights on the GPU, as the kernels read them: what CudaModel uploads (or fills
// with random values) once, and what both the rollout engine (engine/cuda_model.h) and the
// trainer (train/cuda_policy.h) read, so generation and training share one copy.
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "cuda/buffer.h"
#include "cuda/moe.h"
#include "io/mxfp4.h"
#include "model/config.h"

namespace ossrl {

// Hands out DeviceBuffers and adds up their bytes; with `count_only` it allocates nothing, so
// one layout function both sizes a plan (to check it fits) and allocates it.
class Allocator {
 public:
  explicit Allocator(bool count_only = false) : count_only_(count_only) {}
  template <class T>
  cuda::DeviceBuffer<T> take(size_t count, const char* what) {
    bytes_ += count * sizeof(T);
    return count_only_ ? cuda::DeviceBuffer<T>() : cuda::DeviceBuffer<T>(count, what);
  }
  size_t bytes() const { return bytes_; }

 private:
  bool count_only_;
  size_t bytes_ = 0;
};

// One projection's experts as cuda/moe.h reads them.
struct DeviceExperts {
  bool mxfp4 = true;
  int experts = 0, out = 0, in = 0;
  cuda::DeviceBuffer<uint8_t> blocks;       // MXFP4 [experts, out, in/32, 16]
  cuda::DeviceBuffer<uint8_t> scales;       // MXFP4 [experts, out, in/32]
  cuda::DeviceBuffer<__nv_bfloat16> dense;  // bf16 [experts, out, in]
  cuda::DeviceBuffer<float> bias;           // [experts, out]

  DeviceExperts(Allocator& a, bool mxfp4_, int experts_, int out_, int in_)
      : mxfp4(mxfp4_), experts(experts_), out(out_), in(in_) {
    const size_t rows = size_t(experts) * size_t(out);
    if (mxfp4) {
      blocks = a.take<uint8_t>(rows * size_t(in / kMxfp4BlockValues) * kMxfp4BlockBytes, "MXFP4 expert blocks");
      scales = a.take<uint8_t>(rows * size_t(in / kMxfp4BlockValues), "MXFP4 expert scales");
    } else {
      dense = a.take<__nv_bfloat16>(rows * size_t(in), "bf16 experts");
    }
    bias = a.take<float>(rows, "expert biases");
  }
  cuda::ExpertWeights view() const {
    return cuda::ExpertWeights{mxfp4, blocks.data(), scales.data(), dense.data(), bias.data(), experts, out, in};
  }
};

// One decoder layer's weights on the GPU. Biases are empty (null) without attention_bias.
struct DeviceLayer {
  cuda::DeviceBuffer<float> input_layernorm;           // [hidden]
  cuda::DeviceBuffer<float> post_attention_layernorm;  // [hidden]
  // q_proj, k_proj and v_proj stacked into one [(heads + 2*kv_heads) * head_dim, hidden]
  // matrix: one GEMM gives rope_qkv_forward its packed [n, q | k | v] input.
  cuda::DeviceBuffer<__nv_bfloat16> qkv;
  cuda::DeviceBuffer<float> qkv_bias;        // [(heads + 2*kv_heads) * head_dim]
  cuda::DeviceBuffer<__nv_bfloat16> o_proj;  // [hidden, heads * head_dim]
  cuda::DeviceBuffer<float> o_bias;          // [hidden]
  cuda::DeviceBuffer<float> sinks;           // [heads]
  cuda::DeviceBuffer<__nv_bfloat16> router;  // [experts, hidden]
  cuda::DeviceBuffer<float> router_bias;     // [experts]
  DeviceExperts gate_up;                     // [experts, 2*intermediate, hidden], gate even rows, up odd
  DeviceExperts down;                        // [experts, hidden, intermediate]
  int sliding_window = 0;                    // 0: full attention

  DeviceLayer(Allocator& a, const GptOssConfig& c, int l, bool mxfp4_experts)
      : input_layernorm(a.take<float>(size_t(c.hidden_size), "norm weights")),
        post_attention_layernorm(a.take<float>(size_t(c.hidden_size), "norm weights")),
        qkv(a.take<__nv_bfloat16>(qkv_rows(c) * size_t(c.hidden_size), "qkv_proj")),
        qkv_bias(a.take<float>(c.attention_bias ? qkv_rows(c) : 0, "qkv bias")),
        o_proj(a.take<__nv_bfloat16>(size_t(c.hidden_size) * q_dim(c), "o_proj")),
        o_bias(a.take<float>(c.attention_bias ? size_t(c.hidden_size) : 0, "o_proj bias")),
        sinks(a.take<float>(size_t(c.num_attention_heads), "sinks")),
        router(a.take<__nv_bfloat16>(size_t(c.num_local_experts) * size_t(c.hidden_size), "router")),
        router_bias(a.take<float>(size_t(c.num_local_experts), "router bias")),
        gate_up(a, mxfp4_experts, c.num_local_experts, 2 * c.intermediate_size, c.hidden_size),
        down(a, mxfp4_experts, c.num_local_experts, c.hidden_size, c.intermediate_size),
        sliding_window(c.layer_types[size_t(l)] == AttentionType::Sliding ? c.sliding_window : 0) {}

  static size_t q_dim(const GptOssConfig& c) { return size_t(c.num_attention_heads) * size_t(c.head_dim); }
  static size_t qkv_rows(const GptOssConfig& c) {
    return size_t(c.num_attention_heads + 2 * c.num_key_value_heads) * size_t(c.head_dim);
  }
};

// Every weight of the model. lm_head is empty when tied to embed_tokens.
struct DeviceWeights {
  GptOssConfig config;
  size_t bytes = 0;                                // GPU memory of all of the below
  cuda::DeviceBuffer<__nv_bfloat16> embed_tokens;  // [vocab, hidden]; empty when offloaded
  // embed_tokens offloaded (engine/cuda_model.h's ModelOptions): pinned host memory mapped into
  // the device's address space, at its device address; null when on the GPU.
  std::shared_ptr<__nv_bfloat16> host_embed_tokens;
  std::vector<DeviceLayer> layers;
  cuda::DeviceBuffer<float> norm;             // [hidden]
  cuda::DeviceBuffer<__nv_bfloat16> lm_head;  // [vocab, hidden]; empty when tied
  cuda::DeviceBuffer<float> inv_freq;         // [head_dim / 2] model/rope.h's YaRN frequencies
  float attention_scaling = 1.0f;

  // Whether any layer's experts are MXFP4 (else all are bf16).
  bool mxfp4_experts() const {
    for (const DeviceLayer& l : layers) {
      if (l.gate_up.mxfp4) return true;
    }
    return false;
  }

  // The embedding table as kernels read it, on the GPU or mapped from the host.
  const __nv_bfloat16* embedding_table() const {
    return host_embed_tokens ? host_embed_tokens.get() : embed_tokens.data();
  }

  const __nv_bfloat16* lm_head_weight() const {
    return config.tie_word_embeddings ? embed_tokens.data() : lm_head.data();
  }
};

}  // namespace ossrl
