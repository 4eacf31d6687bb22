#include "model/weights.h"

#include <cstring>
#include <string>

#include "core/error.h"
#include "io/mxfp4.h"
#include "model/checkpoint_check.h"

namespace ossrl {

void WeightMatrix::decode_stored(int64_t r, int64_t begin, int64_t end, float* dst) const {
  const int64_t n = end - begin;
  switch (format) {
    case WeightFormat::F32:
      // memcpy, not a cast: safetensors does not align tensors.
      std::memcpy(dst, data + (r * stored_cols() + begin) * 4, size_t(n) * 4);
      break;
    case WeightFormat::BF16: {
      const uint8_t* p = data + (r * stored_cols() + begin) * 2;
      for (int64_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, p + 2 * i, 2);
        dst[i] = bf16_to_f32(bits);
      }
      break;
    }
    case WeightFormat::MXFP4: {
      const int64_t row_blocks = in / kMxfp4BlockValues;
      const int64_t b = r * row_blocks + begin / kMxfp4BlockValues;
      mxfp4_decode_f32(data + b * kMxfp4BlockBytes, scales + b, size_t(n / kMxfp4BlockValues), dst);
      break;
    }
  }
}

namespace {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

const TensorView& tensor_with_shape(const Checkpoint& ckpt, const std::string& name,
                                    const std::vector<int64_t>& shape) {
  const TensorView& t = ckpt.tensor(name);
  OSSRL_CHECK(t.shape == shape, "{}: tensor {} has shape {}, expected {} from config.json",
              t.file, name, t.shape_str(), shape_string(shape));
  return t;
}

WeightFormat dense_format(const TensorView& t) {
  if (t.dtype == DType::F32) return WeightFormat::F32;
  if (t.dtype == DType::BF16) return WeightFormat::BF16;
  fail("{}: tensor {} is {}, expected F32 or BF16", t.file, t.name, dtype_name(t.dtype));
}

// nn.Linear weight `name`, [out, in].
WeightMatrix linear_weight(const Checkpoint& ckpt, const std::string& name, int64_t out, int64_t in) {
  const TensorView& t = tensor_with_shape(ckpt, name, {out, in});
  return WeightMatrix{dense_format(t), out, in, false, t.data, nullptr};
}

// A small F32/BF16 tensor copied to fp32.
std::vector<float> vector_f32(const Checkpoint& ckpt, const std::string& name,
                              const std::vector<int64_t>& shape) {
  const TensorView& t = tensor_with_shape(ckpt, name, shape);
  const int64_t n = t.numel();
  WeightMatrix row{dense_format(t), 1, n, false, t.data, nullptr};
  std::vector<float> v(static_cast<size_t>(n));
  row.decode_row(0, v.data());
  return v;
}

// `<prefix>_blocks` U8 [experts, out, in/32, 16] and `<prefix>_scales` U8 [experts, out, in/32]:
// one [out, in] MXFP4 view per expert.
std::vector<WeightMatrix> mxfp4_experts(const Checkpoint& ckpt, const std::string& prefix,
                                        int64_t experts, int64_t out, int64_t in) {
  OSSRL_CHECK(in % kMxfp4BlockValues == 0, "{}: input size {} is not a multiple of 32, MXFP4 needs it",
              prefix, in);
  const int64_t row_blocks = in / kMxfp4BlockValues;
  const TensorView& blocks = tensor_with_shape(ckpt, prefix + "_blocks", {experts, out, row_blocks, 16});
  const TensorView& scales = tensor_with_shape(ckpt, prefix + "_scales", {experts, out, row_blocks});
  OSSRL_CHECK(blocks.dtype == DType::U8 && scales.dtype == DType::U8,
              "{}: {}_blocks/_scales must be U8, found {}/{}", blocks.file, prefix,
              dtype_name(blocks.dtype), dtype_name(scales.dtype));
  std::vector<WeightMatrix> views;
  for (int64_t e = 0; e < experts; ++e) {
    views.push_back(WeightMatrix{WeightFormat::MXFP4, out, in, false,
                                 blocks.data + e * out * row_blocks * kMxfp4BlockBytes,
                                 scales.data + e * out * row_blocks});
  }
  return views;
}

// transformers' dense expert parameter `name`, stored [experts, in, out]: one transposed
// [out, in] view per expert.
std::vector<WeightMatrix> dense_experts(const Checkpoint& ckpt, const std::string& name,
                                        int64_t experts, int64_t out, int64_t in) {
  const TensorView& t = tensor_with_shape(ckpt, name, {experts, in, out});
  const WeightFormat format = dense_format(t);
  const int64_t bytes_per_expert = in * out * int64_t(dtype_size(t.dtype));
  std::vector<WeightMatrix> views;
  for (int64_t e = 0; e < experts; ++e) {
    views.push_back(WeightMatrix{format, out, in, true, t.data + e * bytes_per_expert, nullptr});
  }
  return views;
}

AttentionWeights load_attention(const Checkpoint& ckpt, const std::string& prefix,
                                const GptOssConfig& c) {
  const int64_t hidden = c.hidden_size;
  const int64_t q_dim = int64_t(c.num_attention_heads) * c.head_dim;
  const int64_t kv_dim = int64_t(c.num_key_value_heads) * c.head_dim;
  AttentionWeights w;
  w.q_proj = linear_weight(ckpt, prefix + "q_proj.weight", q_dim, hidden);
  w.k_proj = linear_weight(ckpt, prefix + "k_proj.weight", kv_dim, hidden);
  w.v_proj = linear_weight(ckpt, prefix + "v_proj.weight", kv_dim, hidden);
  w.o_proj = linear_weight(ckpt, prefix + "o_proj.weight", hidden, q_dim);
  if (c.attention_bias) {
    w.q_bias = vector_f32(ckpt, prefix + "q_proj.bias", {q_dim});
    w.k_bias = vector_f32(ckpt, prefix + "k_proj.bias", {kv_dim});
    w.v_bias = vector_f32(ckpt, prefix + "v_proj.bias", {kv_dim});
    w.o_bias = vector_f32(ckpt, prefix + "o_proj.bias", {hidden});
  }
  w.sinks = vector_f32(ckpt, prefix + "sinks", {c.num_attention_heads});
  return w;
}

MoeWeights load_moe(const Checkpoint& ckpt, const std::string& prefix, ExpertLayout layout,
                    const GptOssConfig& c) {
  const int64_t experts = c.num_local_experts;
  const int64_t hidden = c.hidden_size;
  const int64_t inter = c.intermediate_size;
  MoeWeights w;
  w.router = linear_weight(ckpt, prefix + "router.weight", experts, hidden);
  w.router_bias = vector_f32(ckpt, prefix + "router.bias", {experts});
  const std::string e = prefix + "experts.";
  if (layout == ExpertLayout::Mxfp4) {
    w.gate_up = mxfp4_experts(ckpt, e + "gate_up_proj", experts, 2 * inter, hidden);
    w.down = mxfp4_experts(ckpt, e + "down_proj", experts, hidden, inter);
  } else {
    w.gate_up = dense_experts(ckpt, e + "gate_up_proj", experts, 2 * inter, hidden);
    w.down = dense_experts(ckpt, e + "down_proj", experts, hidden, inter);
  }
  w.gate_up_bias = vector_f32(ckpt, e + "gate_up_proj_bias", {experts, 2 * inter});
  w.down_bias = vector_f32(ckpt, e + "down_proj_bias", {experts, hidden});
  return w;
}

}  // namespace

GptOssWeights load_gpt_oss_weights(const Checkpoint& ckpt, const GptOssConfig& c) {
  const int64_t hidden = c.hidden_size;
  GptOssWeights w;
  w.embed_tokens = linear_weight(ckpt, "model.embed_tokens.weight", c.vocab_size, hidden);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string prefix = layer_tensor_name(l, "");
    LayerWeights layer;
    layer.input_layernorm = vector_f32(ckpt, prefix + "input_layernorm.weight", {hidden});
    layer.post_attention_layernorm =
        vector_f32(ckpt, prefix + "post_attention_layernorm.weight", {hidden});
    layer.attn = load_attention(ckpt, prefix + "self_attn.", c);
    layer.mlp = load_moe(ckpt, prefix + "mlp.", detect_expert_layout(ckpt, l), c);
    w.layers.push_back(std::move(layer));
  }
  w.norm = vector_f32(ckpt, "model.norm.weight", {hidden});
  const std::string head = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  w.lm_head = linear_weight(ckpt, head, c.vocab_size, hidden);
  return w;
}

}  // namespace ossrl
