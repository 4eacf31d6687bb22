#include "model/checkpoint_check.h"

#include <algorithm>
#include <charconv>
#include <vector>

#include <fmt/ranges.h>

#include "core/error.h"
#include "io/mxfp4.h"

namespace ossrl {

namespace {

// One dimension the config implies, with the reason a user can check against
// config.json ("num_attention_heads 64 x head_dim 64"); empty for constants of the format.
struct Dim {
  int64_t size;
  std::string why;
};

struct Expected {
  std::string name;
  std::vector<Dim> shape;
  std::vector<DType> dtypes;
};

const std::vector<DType> kFloat = {DType::BF16, DType::F32};
const std::vector<DType> kBytes = {DType::U8};

void check_tensor(const Checkpoint& checkpoint, const Expected& e) {
  const TensorView& t = checkpoint.tensor(e.name);  // throws naming the checkpoint's files
  if (std::find(e.dtypes.begin(), e.dtypes.end(), t.dtype) == e.dtypes.end()) {
    std::vector<std::string_view> names;
    for (DType d : e.dtypes) names.push_back(dtype_name(d));
    fail("{} has dtype {}, expected {} in {}", e.name, dtype_name(t.dtype), fmt::join(names, " or "),
         t.file);
  }
  std::vector<int64_t> want;
  std::vector<std::string> why;
  for (const Dim& d : e.shape) {
    want.push_back(d.size);
    if (!d.why.empty() && std::find(why.begin(), why.end(), d.why) == why.end()) why.push_back(d.why);
  }
  if (t.shape != want) {
    fail("{} has shape {}, expected [{}] (config.json: {}) in {}", e.name, t.shape_str(),
         fmt::join(want, ", "), fmt::join(why, ", "), t.file);
  }
}

// The N of "model.layers.N.", or -1 for a name outside the layers.
int layer_of(const std::string& name) {
  constexpr std::string_view prefix = "model.layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return -1;
  int layer = -1;
  const char* first = name.data() + prefix.size();
  const auto [end, ec] = std::from_chars(first, name.data() + name.size(), layer);
  return ec == std::errc() && end != first && *end == '.' ? layer : -1;
}

}  // namespace

std::string layer_tensor_name(int layer, std::string_view suffix) {
  return fmt::format("model.layers.{}.{}", layer, suffix);
}

ExpertLayout detect_expert_layout(const Checkpoint& checkpoint, int layer) {
  const std::string blocks = layer_tensor_name(layer, "mlp.experts.gate_up_proj_blocks");
  const std::string dense = layer_tensor_name(layer, "mlp.experts.gate_up_proj");
  const bool has_blocks = checkpoint.contains(blocks);
  const bool has_dense = checkpoint.contains(dense);
  OSSRL_CHECK(has_blocks || has_dense,
              "checkpoint {} has neither {} (MXFP4) nor {} (dequantised): layer {} has no experts",
              checkpoint.dir(), blocks, dense, layer);
  OSSRL_CHECK(!(has_blocks && has_dense), "checkpoint {} has both {} and {}: ambiguous expert layout",
              checkpoint.dir(), blocks, dense);
  return has_blocks ? ExpertLayout::Mxfp4 : ExpertLayout::Dense;
}

void validate_gpt_oss_checkpoint(const Checkpoint& checkpoint, const GptOssConfig& c) {
  const Dim H{c.hidden_size, fmt::format("hidden_size {}", c.hidden_size)};
  const Dim V{c.vocab_size, fmt::format("vocab_size {}", c.vocab_size)};
  const Dim E{c.num_local_experts, fmt::format("num_local_experts {}", c.num_local_experts)};
  const Dim I{c.intermediate_size, fmt::format("intermediate_size {}", c.intermediate_size)};
  const Dim I2{2 * int64_t(c.intermediate_size), fmt::format("2 x intermediate_size {}", c.intermediate_size)};
  const Dim heads{c.num_attention_heads, fmt::format("num_attention_heads {}", c.num_attention_heads)};
  const Dim Q{int64_t(c.num_attention_heads) * c.head_dim,
              fmt::format("num_attention_heads {} x head_dim {}", c.num_attention_heads, c.head_dim)};
  const Dim KV{int64_t(c.num_key_value_heads) * c.head_dim,
               fmt::format("num_key_value_heads {} x head_dim {}", c.num_key_value_heads, c.head_dim)};

  std::vector<Expected> expected = {
      {"model.embed_tokens.weight", {V, H}, kFloat},
      {"model.norm.weight", {H}, kFloat},
  };
  if (!c.tie_word_embeddings) expected.push_back({"lm_head.weight", {V, H}, kFloat});

  for (int l = 0; l < c.num_hidden_layers; ++l) {
    auto add = [&](std::string_view suffix, std::vector<Dim> shape, const std::vector<DType>& dtypes) {
      expected.push_back({layer_tensor_name(l, suffix), std::move(shape), dtypes});
    };
    add("input_layernorm.weight", {H}, kFloat);
    add("post_attention_layernorm.weight", {H}, kFloat);
    add("self_attn.q_proj.weight", {Q, H}, kFloat);
    add("self_attn.k_proj.weight", {KV, H}, kFloat);
    add("self_attn.v_proj.weight", {KV, H}, kFloat);
    add("self_attn.o_proj.weight", {H, Q}, kFloat);
    if (c.attention_bias) {
      add("self_attn.q_proj.bias", {Q}, kFloat);
      add("self_attn.k_proj.bias", {KV}, kFloat);
      add("self_attn.v_proj.bias", {KV}, kFloat);
      add("self_attn.o_proj.bias", {H}, kFloat);
    }
    add("self_attn.sinks", {heads}, kFloat);
    add("mlp.router.weight", {E, H}, kFloat);
    add("mlp.router.bias", {E}, kFloat);
    add("mlp.experts.gate_up_proj_bias", {E, I2}, kFloat);
    add("mlp.experts.down_proj_bias", {E, H}, kFloat);

    if (detect_expert_layout(checkpoint, l) == ExpertLayout::Dense) {
      add("mlp.experts.gate_up_proj", {E, H, I2}, kFloat);
      add("mlp.experts.down_proj", {E, I, H}, kFloat);
      continue;
    }
    // MXFP4 blocks run along the input features, so both input sizes must fill whole blocks.
    for (const Dim& in : {H, I}) {
      OSSRL_CHECK(in.size % kMxfp4BlockValues == 0,
                  "{}: {} is not a multiple of {}, but {} stores MXFP4 experts in blocks of {}",
                  checkpoint.config_path(), in.why, kMxfp4BlockValues,
                  layer_tensor_name(l, "mlp.experts"), kMxfp4BlockValues);
    }
    const Dim block_bytes{kMxfp4BlockBytes, ""};
    const Dim H_blocks{H.size / kMxfp4BlockValues, H.why + " / 32"};
    const Dim I_blocks{I.size / kMxfp4BlockValues, I.why + " / 32"};
    add("mlp.experts.gate_up_proj_blocks", {E, I2, H_blocks, block_bytes}, kBytes);
    add("mlp.experts.gate_up_proj_scales", {E, I2, H_blocks}, kBytes);
    add("mlp.experts.down_proj_blocks", {E, H, I_blocks, block_bytes}, kBytes);
    add("mlp.experts.down_proj_scales", {E, H, I_blocks}, kBytes);
  }

  for (const Expected& e : expected) check_tensor(checkpoint, e);

  for (const std::string& name : checkpoint.names()) {
    const int layer = layer_of(name);
    OSSRL_CHECK(layer < c.num_hidden_layers,
                "{} is in the checkpoint ({}), but config.json says num_hidden_layers {}: config "
                "and weights are from different models",
                name, checkpoint.tensor(name).file, c.num_hidden_layers);
  }
}

}  // namespace ossrl
