// gpt-oss parameters as views into the checkpoint's memory map. The big matrices (embedding,
// attention projections, experts, lm_head) stay in the checkpoint's own encoding (fp32,
// bf16 or MXFP4) and are decoded a row at a time inside the matmul, so the 20b model runs
// from its 13 GB mmap without an 84 GB fp32 copy. Vectors (norm weights, biases, sinks) are
// small and are copied to fp32 once at load.
#pragma once

#include <cstdint>
#include <vector>

#include "io/checkpoint.h"
#include "model/config.h"

namespace ossrl {

enum class WeightFormat { F32, BF16, MXFP4 };

// One weight matrix W, logically [out, in], used as y = x Wᵀ. Stored either row-major
// [out, in] (nn.Linear, MXFP4 experts) or `transposed` as [in, out] (transformers' dense
// expert parameters gate_up_proj / down_proj). MXFP4 is always [out, in]: its blocks run
// along `in`.
struct WeightMatrix {
  WeightFormat format = WeightFormat::F32;
  int64_t out = 0;
  int64_t in = 0;
  bool transposed = false;
  const uint8_t* data = nullptr;    // F32/BF16 elements, or MXFP4 blocks [out, in/32, 16]
  const uint8_t* scales = nullptr;  // MXFP4 only: E8M0 scales [out, in/32]

  // Storage row length: [out, in], or [in, out] when transposed.
  int64_t stored_cols() const { return transposed ? out : in; }
  // Decodes stored row r, columns [begin, end), to fp32. For MXFP4 begin and end are
  // multiples of 32.
  void decode_stored(int64_t r, int64_t begin, int64_t end, float* dst) const;
  // Decodes logical row W[o, :] (`in` values); requires !transposed.
  void decode_row(int64_t o, float* dst) const { decode_stored(o, 0, in, dst); }
};

struct AttentionWeights {
  WeightMatrix q_proj;  // [heads*head_dim, hidden]
  WeightMatrix k_proj;  // [kv_heads*head_dim, hidden]
  WeightMatrix v_proj;  // [kv_heads*head_dim, hidden]
  WeightMatrix o_proj;  // [hidden, heads*head_dim]
  // Empty when config.attention_bias is false.
  std::vector<float> q_bias, k_bias, v_bias, o_bias;
  std::vector<float> sinks;  // [heads]
};

struct MoeWeights {
  WeightMatrix router;             // [experts, hidden]
  std::vector<float> router_bias;  // [experts]
  // One view per expert. gate_up's output rows interleave gate (even) and up (odd).
  std::vector<WeightMatrix> gate_up;  // each [2*intermediate, hidden]
  std::vector<WeightMatrix> down;     // each [hidden, intermediate]
  std::vector<float> gate_up_bias;    // [experts, 2*intermediate]
  std::vector<float> down_bias;       // [experts, hidden]
};

struct LayerWeights {
  std::vector<float> input_layernorm;           // [hidden]
  std::vector<float> post_attention_layernorm;  // [hidden]
  AttentionWeights attn;
  MoeWeights mlp;
};

struct GptOssWeights {
  WeightMatrix embed_tokens;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  std::vector<float> norm;  // [hidden]
  WeightMatrix lm_head;     // [vocab, hidden]
};

// Views every parameter of `ckpt`, checking names, shapes and dtypes against `config`;
// throws an Error naming the tensor and file on any mismatch. `ckpt` must outlive the
// result. Experts may be MXFP4 (`*_blocks`/`*_scales`) or dense (`gate_up_proj`,
// `down_proj`), per layer.
GptOssWeights load_gpt_oss_weights(const Checkpoint& ckpt, const GptOssConfig& config);

}  // namespace ossrl
