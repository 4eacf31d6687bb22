// What a gpt-oss checkpoint must contain for a given config, checked before any weight is
// used: every tensor present, with the shape the config implies and a dtype we can read.
// The experts of a layer come in one of two layouts (spec §3), detected per layer.
#pragma once

#include <string>
#include <string_view>

#include "io/checkpoint.h"
#include "model/config.h"

namespace ossrl {

enum class ExpertLayout {
  // As released: mlp.experts.{gate_up,down}_proj_{blocks,scales} (U8), rows are output
  // features: gate_up [E, 2I, H/32, 16] + [E, 2I, H/32], down [E, H, I/32, 16] + [E, H, I/32].
  Mxfp4,
  // As saved after dequantisation: mlp.experts.gate_up_proj [E, H, 2I] and down_proj
  // [E, I, H] (BF16 or F32), input features first (transformers' parameter layout).
  Dense,
};

// "model.layers.3." + suffix: the one place the per-layer naming scheme lives.
std::string layer_tensor_name(int layer, std::string_view suffix);

// The layout of layer `layer`'s experts; throws when the checkpoint has neither (or both).
ExpertLayout detect_expert_layout(const Checkpoint& checkpoint, int layer);

// Throws an Error for the first tensor that is missing, has the wrong shape or an
// unsupported dtype, e.g. "model.layers.3.self_attn.q_proj.weight has shape [128, 64],
// expected [256, 64] (config.json: num_attention_heads 4 x head_dim 64, hidden_size 64)
// in .../model-00001-of-00002.safetensors". Also rejects layers beyond num_hidden_layers,
// which mean the config and the weights are from different models.
void validate_gpt_oss_checkpoint(const Checkpoint& checkpoint, const GptOssConfig& config);

}  // namespace ossrl
