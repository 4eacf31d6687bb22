#include "model/config.h"


#include <cmath>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_file.h"

namespace ossrl {

namespace {

using json = nlohmann::json;
using Keys = std::initializer_list<std::string_view>;

// Reads typed fields of one JSON object. Every error names the file and the field as it
// is spelled there; `prefix` qualifies fields of a nested object ("rope_scaling.factor").
class Fields {
 public:
  Fields(const json& object, const std::string& source, std::string prefix = "")
      : object_(object), source_(source), prefix_(std::move(prefix)) {}

  // The value under the first of `keys` present (null counts as absent), or nullptr.
  // Writers spell some fields two ways; when both are present they must agree.
  const json* find(Keys keys, std::string_view* found_key = nullptr) const {
    const json* found = nullptr;
    std::string_view found_name;
    for (std::string_view key : keys) {
      auto it = object_.find(std::string(key));
      if (it == object_.end() || it->is_null()) continue;
      if (!found) {
        found = &*it;
        found_name = key;
      } else {
        OSSRL_CHECK(*found == *it, "{}: {}{} is {} but {}{} is {}", source_, prefix_, found_name,
                    found->dump(), prefix_, key, it->dump());
      }
    }
    if (found_key) *found_key = found_name;
    return found;
  }

  std::optional<double> number(Keys keys) const {
    std::string_view key;
    const json* v = find(keys, &key);
    if (!v) return std::nullopt;
    OSSRL_CHECK(v->is_number(), "{}: {}{} must be a number, got {}", source_, prefix_, key,
                v->dump());
    return v->get<double>();
  }

  // Integers written as 4096.0 are accepted; 4096.5 is not.
  std::optional<int> integer(Keys keys) const {
    std::string_view key;
    const json* v = find(keys, &key);
    if (!v) return std::nullopt;
    const bool integral = v->is_number() && std::floor(v->get<double>()) == v->get<double>();
    const bool fits = integral && std::fabs(v->get<double>()) <= std::numeric_limits<int>::max();
    OSSRL_CHECK(fits, "{}: {}{} must be an integer, got {}", source_, prefix_, key, v->dump());
    return int(v->get<double>());
  }

  std::optional<bool> boolean(Keys keys) const {
    std::string_view key;
    const json* v = find(keys, &key);
    if (!v) return std::nullopt;
    OSSRL_CHECK(v->is_boolean(), "{}: {}{} must be true or false, got {}", source_, prefix_, key,
                v->dump());
    return v->get<bool>();
  }

  std::optional<std::string> string(Keys keys) const {
    std::string_view key;
    const json* v = find(keys, &key);
    if (!v) return std::nullopt;
    OSSRL_CHECK(v->is_string(), "{}: {}{} must be a string, got {}", source_, prefix_, key,
                v->dump());
    return v->get<std::string>();
  }

  // A shape field: the checkpoint cannot be interpreted without it.
  int required_integer(Keys keys) const {
    std::optional<int> v = integer(keys);
    if (!v) {
      std::string names;
      for (std::string_view key : keys) {
        names += names.empty() ? fmt::format("\"{}{}\"", prefix_, key)
                               : fmt::format(" (or \"{}{}\")", prefix_, key);
      }
      fail("{}: missing required field {}", source_, names);
    }
    return *v;
  }

 private:
  const json& object_;
  const std::string& source_;
  std::string prefix_;
};

std::vector<AttentionType> alternating_layer_types(int n) {
  std::vector<AttentionType> types(size_t(std::max(n, 0)));
  for (int i = 0; i < n; ++i) types[size_t(i)] = i % 2 == 0 ? AttentionType::Sliding : AttentionType::Full;
  return types;
}

// Released checkpoints: top-level rope_theta plus rope_scaling {type|rope_type, ...};
// transformers 5: rope_parameters {rope_type, rope_theta, ...}. Neither present means
// transformers' default, which is gpt-oss's YaRN (RopeConfig's defaults).
RopeConfig parse_rope(const json& j, const std::string& source) {
  RopeConfig rope;
  const Fields top(j, source);
  // A transformers 5 save of a released config may carry both; rope_parameters is the
  // one transformers reads then.
  std::string_view params_key = "rope_parameters";
  const json* params = top.find({params_key});
  if (!params) {
    params_key = "rope_scaling";
    params = top.find({params_key});
  }
  if (params) {
    OSSRL_CHECK(params->is_object(), "{}: {} must be an object", source, params_key);
  }
  const json empty = json::object();
  const Fields p(params ? *params : empty, source, fmt::format("{}.", params_key));

  const std::optional<double> inner_theta = p.number({"rope_theta"});
  const std::optional<double> outer_theta = top.number({"rope_theta"});
  OSSRL_CHECK(!inner_theta || !outer_theta || *inner_theta == *outer_theta,
              "{}: rope_theta is {} but {}.rope_theta is {}", source, *outer_theta, params_key,
              *inner_theta);
  rope.theta = inner_theta.value_or(outer_theta.value_or(rope.theta));

  const std::optional<std::string> type_field = p.string({"rope_type", "type"});
  OSSRL_CHECK(type_field || !params, "{}: {} has no rope_type", source, params_key);
  const std::string type = type_field.value_or("yarn");
  if (type == "default") {
    rope.factor = 1.0;
  } else if (type == "yarn") {
    rope.factor = p.number({"factor"}).value_or(rope.factor);
    rope.beta_fast = p.number({"beta_fast"}).value_or(rope.beta_fast);
    rope.beta_slow = p.number({"beta_slow"}).value_or(rope.beta_slow);
    rope.original_max_position_embeddings =
        p.integer({"original_max_position_embeddings"}).value_or(rope.original_max_position_embeddings);
    rope.truncate = p.boolean({"truncate"}).value_or(rope.truncate);
  } else {
    fail("{}: {}.rope_type \"{}\" is not supported (gpt-oss uses \"yarn\")", source, params_key,
         type);
  }
  OSSRL_CHECK(rope.theta > 0, "{}: rope_theta must be positive, got {}", source, rope.theta);
  OSSRL_CHECK(rope.factor >= 1, "{}: {}.factor must be >= 1, got {}", source, params_key,
              rope.factor);
  OSSRL_CHECK(rope.original_max_position_embeddings > 0,
              "{}: {}.original_max_position_embeddings must be positive, got {}", source,
              params_key, rope.original_max_position_embeddings);
  return rope;
}

std::vector<AttentionType> parse_layer_types(const json& j, const std::string& source, int n_layers) {
  auto it = j.find("layer_types");
  if (it == j.end() || it->is_null()) return alternating_layer_types(n_layers);
  OSSRL_CHECK(it->is_array(), "{}: layer_types must be a list", source);
  OSSRL_CHECK(it->size() == size_t(n_layers), "{}: layer_types has {} entries but num_hidden_layers is {}",
              source, it->size(), n_layers);
  std::vector<AttentionType> types;
  for (size_t i = 0; i < it->size(); ++i) {
    const json& t = (*it)[i];
    if (t == "sliding_attention") {
      types.push_back(AttentionType::Sliding);
    } else if (t == "full_attention") {
      types.push_back(AttentionType::Full);
    } else {
      fail("{}: layer_types[{}] is {}, expected \"sliding_attention\" or \"full_attention\"",
           source, i, t.dump());
    }
  }
  return types;
}

std::vector<int> parse_eos(const json& j, const std::string& source) {
  auto it = j.find("eos_token_id");
  if (it == j.end() || it->is_null()) return {};
  const json list = it->is_array() ? *it : json::array({*it});
  std::vector<int> ids;
  for (const json& id : list) {
    OSSRL_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0,
                "{}: eos_token_id must be a token id, a list of them or null, got {}", source,
                it->dump());
    ids.push_back(id.get<int>());
  }
  return ids;
}

}  // namespace

GptOssConfig GptOssConfig::from_json(const nlohmann::json& j, const std::string& source) {
  OSSRL_CHECK(j.is_object(), "{}: expected a JSON object", source);
  const Fields f(j, source);
  const std::optional<std::string> model_type = f.string({"model_type"});
  OSSRL_CHECK(!model_type || *model_type == "gpt_oss",
              "{}: model_type is \"{}\", expected \"gpt_oss\"", source, *model_type);

  GptOssConfig c;
  c.num_hidden_layers = f.required_integer({"num_hidden_layers"});
  c.hidden_size = f.required_integer({"hidden_size"});
  c.intermediate_size = f.required_integer({"intermediate_size"});
  c.num_local_experts = f.required_integer({"num_local_experts", "num_experts"});
  c.experts_per_token = f.required_integer({"experts_per_token", "num_experts_per_tok"});
  c.num_attention_heads = f.required_integer({"num_attention_heads"});
  c.num_key_value_heads = f.required_integer({"num_key_value_heads"});
  c.head_dim = f.required_integer({"head_dim"});
  c.vocab_size = f.required_integer({"vocab_size"});
  c.sliding_window = f.integer({"sliding_window"}).value_or(c.sliding_window);
  c.max_position_embeddings = f.integer({"max_position_embeddings"}).value_or(c.max_position_embeddings);
  c.rms_norm_eps = f.number({"rms_norm_eps"}).value_or(c.rms_norm_eps);
  c.swiglu_limit = f.number({"swiglu_limit"}).value_or(c.swiglu_limit);
  c.attention_bias = f.boolean({"attention_bias"}).value_or(c.attention_bias);
  c.tie_word_embeddings = f.boolean({"tie_word_embeddings"}).value_or(c.tie_word_embeddings);
  c.eos_token_ids = parse_eos(j, source);
  c.pad_token_id = f.integer({"pad_token_id"}).value_or(-1);

  const std::pair<const char*, int> sizes[] = {
      {"num_hidden_layers", c.num_hidden_layers},     {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},     {"num_local_experts", c.num_local_experts},
      {"experts_per_token", c.experts_per_token},     {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads}, {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},                   {"sliding_window", c.sliding_window},
      {"max_position_embeddings", c.max_position_embeddings},
  };
  for (const auto& [name, value] : sizes) {
    OSSRL_CHECK(value > 0, "{}: {} must be positive, got {}", source, name, value);
  }
  OSSRL_CHECK(c.num_attention_heads % c.num_key_value_heads == 0,
              "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", source,
              c.num_attention_heads, c.num_key_value_heads);
  OSSRL_CHECK(c.experts_per_token <= c.num_local_experts,
              "{}: experts_per_token {} exceeds num_local_experts {}", source, c.experts_per_token,
              c.num_local_experts);
  OSSRL_CHECK(c.rms_norm_eps > 0, "{}: rms_norm_eps must be positive, got {}", source, c.rms_norm_eps);
  OSSRL_CHECK(c.swiglu_limit > 0, "{}: swiglu_limit must be positive, got {}", source, c.swiglu_limit);

  c.rope = parse_rope(j, source);
  c.layer_types = parse_layer_types(j, source, c.num_hidden_layers);
  return c;
}

GptOssConfig GptOssConfig::from_file(const std::string& path) { return from_json(read_json_file(path), path); }

nlohmann::json GptOssConfig::to_json() const {
  json rope_parameters = {{"rope_type", "default"}, {"rope_theta", rope.theta}};
  if (rope.factor != 1.0) {
    rope_parameters = {{"rope_type", "yarn"},
                       {"rope_theta", rope.theta},
                       {"factor", rope.factor},
                       {"beta_fast", rope.beta_fast},
                       {"beta_slow", rope.beta_slow},
                       {"original_max_position_embeddings", rope.original_max_position_embeddings},
                       {"truncate", rope.truncate}};
  }
  json types = json::array();
  for (AttentionType t : layer_types) {
    types.push_back(t == AttentionType::Sliding ? "sliding_attention" : "full_attention");
  }
  json eos = nullptr;
  if (eos_token_ids.size() == 1) eos = eos_token_ids[0];
  if (eos_token_ids.size() > 1) eos = eos_token_ids;
  return {
      {"architectures", {"GptOssForCausalLM"}},
      {"model_type", "gpt_oss"},
      {"num_hidden_layers", num_hidden_layers},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_local_experts", num_local_experts},
      {"num_experts_per_tok", experts_per_token},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"head_dim", head_dim},
      {"sliding_window", sliding_window},
      {"vocab_size", vocab_size},
      {"max_position_embeddings", max_position_embeddings},
      {"rms_norm_eps", rms_norm_eps},
      // Not a transformers 5 field (it hard-codes 7.0), but written so that a
      // non-default limit survives a save/load round trip through ossrl.
      {"swiglu_limit", swiglu_limit},
      {"attention_bias", attention_bias},
      {"tie_word_embeddings", tie_word_embeddings},
      {"eos_token_id", eos},
      {"pad_token_id", pad_token_id >= 0 ? json(pad_token_id) : json(nullptr)},
      {"rope_parameters", rope_parameters},
      {"layer_types", types},
  };
}

GptOssConfig GptOssConfig::gpt_oss_20b() {
  GptOssConfig c;  // the member defaults are gpt-oss-20b's
  c.layer_types = alternating_layer_types(c.num_hidden_layers);
  return c;
}

GptOssConfig GptOssConfig::gpt_oss_120b() {
  GptOssConfig c;
  c.num_hidden_layers = 36;
  c.num_local_experts = 128;
  c.layer_types = alternating_layer_types(c.num_hidden_layers);
  return c;
}

}  // namespace ossrl
