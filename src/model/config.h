// gpt-oss hyper-parameters, read from a checkpoint's config.json. Accepts every
// spelling the published checkpoints and transformers 5 use (rope_scaling at top level
// or rope_parameters, experts_per_token or num_experts_per_tok, swiglu_limit optional).
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ossrl {

enum class AttentionType { Sliding, Full };

struct RopeConfig {
  double theta = 150000.0;
  // YaRN; factor == 1 means plain RoPE.
  double factor = 32.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  int original_max_position_embeddings = 4096;
  bool truncate = false;
};

struct GptOssConfig {
  int num_hidden_layers = 24;
  int hidden_size = 2880;
  int intermediate_size = 2880;   // per expert
  int num_local_experts = 32;
  int experts_per_token = 4;
  int num_attention_heads = 64;
  int num_key_value_heads = 8;
  int head_dim = 64;
  int sliding_window = 128;
  int vocab_size = 201088;
  int max_position_embeddings = 131072;
  double rms_norm_eps = 1e-5;
  double swiglu_limit = 7.0;
  bool attention_bias = true;
  bool tie_word_embeddings = false;
  // config.json's eos_token_id may be an int, a list or null (empty here).
  std::vector<int> eos_token_ids = {200002};
  int pad_token_id = 199999;  // -1 when config.json says null
  RopeConfig rope;
  std::vector<AttentionType> layer_types;  // one per layer

  // Parses and validates; `source` names the file in error messages. Shape fields
  // (layers, sizes, heads, experts, vocab) are required; the rest default as in
  // transformers. Throws on a missing or mistyped field and on inconsistent values
  // (heads not a multiple of kv heads, experts_per_token > num_local_experts,
  // layer_types of the wrong length, non-positive sizes).
  static GptOssConfig from_json(const nlohmann::json& j, const std::string& source);
  static GptOssConfig from_file(const std::string& path);
  nlohmann::json to_json() const;  // transformers 5 spelling

  // The released gpt-oss-20b / gpt-oss-120b shapes.
  static GptOssConfig gpt_oss_20b();
  static GptOssConfig gpt_oss_120b();
};

}  // namespace ossrl
