#include "model/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cctype>
#include <functional>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io_test_util.h"

namespace ossrl {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using json = nlohmann::json;

// openai/gpt-oss-20b config.json as released: top-level rope_theta and rope_scaling,
// both experts_per_token spellings, swiglu_limit, a quantization_config we ignore.
constexpr std::string_view kReleased20b = R"({
  "architectures": ["GptOssForCausalLM"],
  "attention_bias": true,
  "attention_dropout": 0.0,
  "eos_token_id": 200002,
  "experts_per_token": 4,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 2880,
  "initial_context_length": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 2880,
  "layer_types": [
    "sliding_attention", "full_attention", "sliding_attention", "full_attention",
    "sliding_attention", "full_attention", "sliding_attention", "full_attention",
    "sliding_attention", "full_attention", "sliding_attention", "full_attention",
    "sliding_attention", "full_attention", "sliding_attention", "full_attention",
    "sliding_attention", "full_attention", "sliding_attention", "full_attention",
    "sliding_attention", "full_attention", "sliding_attention", "full_attention"
  ],
  "max_position_embeddings": 131072,
  "model_type": "gpt_oss",
  "num_attention_heads": 64,
  "num_experts_per_tok": 4,
  "num_hidden_layers": 24,
  "num_key_value_heads": 8,
  "num_local_experts": 32,
  "output_router_logits": false,
  "pad_token_id": 199999,
  "quantization_config": {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                               "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4"
  },
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "rope_type": "yarn",
    "truncate": false
  },
  "rope_theta": 150000,
  "router_aux_loss_coef": 0.9,
  "sliding_window": 128,
  "swiglu_limit": 7.0,
  "tie_word_embeddings": false,
  "transformers_version": "4.55.0.dev0",
  "use_cache": true,
  "vocab_size": 201088
})";

void expect_same(const GptOssConfig& a, const GptOssConfig& b) {
  EXPECT_EQ(a.to_json(), b.to_json());  // to_json writes every field
}

GptOssConfig parse(std::string_view text) { return GptOssConfig::from_json(json::parse(text), "config.json"); }

TEST(Config, ReleasedGptOss20b) {
  const GptOssConfig c = parse(kReleased20b);
  EXPECT_EQ(c.num_hidden_layers, 24);
  EXPECT_EQ(c.hidden_size, 2880);
  EXPECT_EQ(c.intermediate_size, 2880);
  EXPECT_EQ(c.num_local_experts, 32);
  EXPECT_EQ(c.experts_per_token, 4);
  EXPECT_EQ(c.num_attention_heads, 64);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.sliding_window, 128);
  EXPECT_EQ(c.vocab_size, 201088);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.swiglu_limit, 7.0);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.eos_token_ids, std::vector<int>{200002});
  EXPECT_EQ(c.pad_token_id, 199999);
  EXPECT_EQ(c.rope.theta, 150000.0);
  EXPECT_EQ(c.rope.factor, 32.0);
  EXPECT_EQ(c.rope.beta_fast, 32.0);
  EXPECT_EQ(c.rope.beta_slow, 1.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 4096);
  EXPECT_FALSE(c.rope.truncate);
  ASSERT_EQ(c.layer_types.size(), 24u);
  EXPECT_EQ(c.layer_types[0], AttentionType::Sliding);
  EXPECT_EQ(c.layer_types[23], AttentionType::Full);
  expect_same(c, GptOssConfig::gpt_oss_20b());
}

// The same model in transformers 5's spelling round-trips through to_json.
TEST(Config, Transformers5SpellingAndRoundTrip) {
  const GptOssConfig released = parse(kReleased20b);
  const json t5 = released.to_json();
  EXPECT_TRUE(t5.contains("rope_parameters"));
  EXPECT_FALSE(t5.contains("rope_scaling"));
  EXPECT_EQ(t5["rope_parameters"]["rope_theta"], 150000.0);
  EXPECT_EQ(t5["num_experts_per_tok"], 4);
  expect_same(GptOssConfig::from_json(t5, "t5.json"), released);
}

TEST(Config, TinyTransformers5Save) {
  const GptOssConfig c = parse(testing::kTinyConfig);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.experts_per_token, 2);
  EXPECT_EQ(c.sliding_window, 8);
  EXPECT_EQ(c.swiglu_limit, 7.0);  // absent in transformers 5 saves
  EXPECT_TRUE(c.eos_token_ids.empty());
  EXPECT_EQ(c.pad_token_id, -1);
  EXPECT_EQ(c.rope.theta, 150000.0);
  EXPECT_EQ(c.rope.factor, 32.0);
}

TEST(Config, OtherSpellings) {
  json j = json::parse(kReleased20b);
  // Legacy "type" key, num_experts, layer_types absent, eos as a list.
  j["rope_scaling"].erase("rope_type");
  j["rope_scaling"]["type"] = "yarn";
  j.erase("num_local_experts");
  j["num_experts"] = 32;
  j.erase("experts_per_token");
  j.erase("layer_types");
  j["eos_token_id"] = {200002, 199999, 200012};
  const GptOssConfig c = GptOssConfig::from_json(j, "x.json");
  EXPECT_EQ(c.num_local_experts, 32);
  EXPECT_EQ(c.experts_per_token, 4);
  EXPECT_EQ(c.rope.factor, 32.0);
  EXPECT_EQ(c.layer_types, GptOssConfig::gpt_oss_20b().layer_types);  // even sliding, odd full
  EXPECT_EQ(c.eos_token_ids, (std::vector<int>{200002, 199999, 200012}));
  EXPECT_EQ(GptOssConfig::from_json(c.to_json(), "y.json").eos_token_ids, c.eos_token_ids);

  // Neither rope_scaling nor rope_parameters: transformers' default, gpt-oss's YaRN.
  j.erase("rope_scaling");
  j.erase("rope_theta");
  EXPECT_EQ(GptOssConfig::from_json(j, "x.json").rope.factor, 32.0);
  // Plain RoPE.
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 10000.0}};
  const GptOssConfig plain = GptOssConfig::from_json(j, "x.json");
  EXPECT_EQ(plain.rope.factor, 1.0);
  EXPECT_EQ(plain.rope.theta, 10000.0);
  expect_same(GptOssConfig::from_json(plain.to_json(), "z.json"), plain);
}

TEST(Config, Gpt120b) {
  const GptOssConfig c = GptOssConfig::gpt_oss_120b();
  EXPECT_EQ(c.num_hidden_layers, 36);
  EXPECT_EQ(c.num_local_experts, 128);
  EXPECT_EQ(c.layer_types.size(), 36u);
  expect_same(GptOssConfig::from_json(c.to_json(), "120b.json"), c);
}

// Each edit of the released config must fail with the file and the field named.
struct BadConfig {
  const char* what;
  std::function<void(json&)> edit;
  std::vector<std::string> must_mention;
};

class ConfigRejects : public ::testing::TestWithParam<BadConfig> {};

TEST_P(ConfigRejects, NamesFileAndField) {
  json j = json::parse(kReleased20b);
  GetParam().edit(j);
  try {
    GptOssConfig::from_json(j, "/ckpt/config.json");
    FAIL() << "accepted: " << GetParam().what;
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("/ckpt/config.json"));
    for (const std::string& s : GetParam().must_mention) EXPECT_THAT(e.what(), HasSubstr(s));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Config, ConfigRejects,
    ::testing::Values(
        BadConfig{"missing hidden_size", [](json& j) { j.erase("hidden_size"); }, {"hidden_size", "missing"}},
        BadConfig{"missing both expert-count spellings", [](json& j) { j.erase("num_local_experts"); },
                  {"num_local_experts", "num_experts"}},
        BadConfig{"heads not a multiple of kv heads", [](json& j) { j["num_key_value_heads"] = 7; },
                  {"num_attention_heads 64", "num_key_value_heads 7"}},
        BadConfig{"too many experts per token", [](json& j) { j["experts_per_token"] = j["num_experts_per_tok"] = 33; },
                  {"experts_per_token 33", "num_local_experts 32"}},
        BadConfig{"spellings disagree", [](json& j) { j["num_experts_per_tok"] = 2; },
                  {"experts_per_token", "num_experts_per_tok"}},
        BadConfig{"layer_types too short", [](json& j) { j["layer_types"].erase(0); },
                  {"layer_types has 23", "num_hidden_layers is 24"}},
        BadConfig{"unknown layer type", [](json& j) { j["layer_types"][3] = "chunked_attention"; },
                  {"layer_types[3]", "chunked_attention"}},
        BadConfig{"zero size", [](json& j) { j["intermediate_size"] = 0; }, {"intermediate_size", "positive"}},
        BadConfig{"negative size", [](json& j) { j["vocab_size"] = -5; }, {"vocab_size", "positive"}},
        BadConfig{"size is a string", [](json& j) { j["head_dim"] = "64"; }, {"head_dim", "integer"}},
        BadConfig{"fractional size", [](json& j) { j["hidden_size"] = 2880.5; }, {"hidden_size", "integer"}},
        BadConfig{"unsupported rope", [](json& j) { j["rope_scaling"]["rope_type"] = "llama3"; },
                  {"rope_scaling.rope_type", "llama3"}},
        BadConfig{"rope without a type", [](json& j) { j["rope_scaling"].erase("rope_type"); },
                  {"rope_scaling", "rope_type"}},
        BadConfig{"rope thetas disagree",
                  [](json& j) { j["rope_scaling"]["rope_theta"] = 10000; }, {"rope_theta"}},
        BadConfig{"other model", [](json& j) { j["model_type"] = "llama"; }, {"model_type", "llama"}},
        BadConfig{"bad eos", [](json& j) { j["eos_token_id"] = "</s>"; }, {"eos_token_id"}},
        BadConfig{"non-positive eps", [](json& j) { j["rms_norm_eps"] = 0; }, {"rms_norm_eps"}}),
    [](const ::testing::TestParamInfo<BadConfig>& info) {
      std::string name = info.param.what;
      for (char& ch : name) {
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
      }
      return name;
    });

TEST(Config, FromFileNamesThePath) {
  testing::ScratchDir dir;
  try {
    GptOssConfig::from_file(dir.file("config.json"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), AllOf(HasSubstr("config.json"), HasSubstr("cannot open")));
  }
  testing::write_file(dir.path() / "config.json", kReleased20b);
  EXPECT_EQ(GptOssConfig::from_file(dir.file("config.json")).num_local_experts, 32);
}

}  // namespace
}  // namespace ossrl
