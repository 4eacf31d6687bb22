// Damaged checkpoints, one kind of damage per row: each must fail to load with an Error
// whose message names the file at fault and, where there is one, the tensor or field, so
// a user can see what to fix without a debugger.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cctype>
#include <functional>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io_test_util.h"
#include "model/checkpoint_check.h"
#include "model/config.h"

namespace ossrl {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testing::TensorSpec;
using testing::TinyExperts;
using json = nlohmann::json;

constexpr const char* kShard1 = "model-00001-of-00002.safetensors";
constexpr const char* kShard2 = "model-00002-of-00002.safetensors";

// What a user's "load this checkpoint" does: open, parse config.json, validate.
void load(const fs::path& dir) {
  const Checkpoint ck = Checkpoint::open(dir.string());
  validate_gpt_oss_checkpoint(ck, GptOssConfig::from_file(ck.config_path()));
}

struct Damage {
  const char* name;
  int shards;  // the good checkpoint the damage is applied to: 1 file, or 2 shards + index
  std::function<void(const fs::path&)> apply;
  std::vector<std::string> must_mention;
};

// --- ways to damage a folder -------------------------------------------------------

std::function<void(const fs::path&)> replace_file(std::string file, std::string bytes) {
  return [=](const fs::path& dir) { testing::write_file(dir / file, bytes); };
}

// model.safetensors replaced by a hand-built file with `header` and `data`.
std::function<void(const fs::path&)> raw_model(std::string header, std::string data) {
  return replace_file("model.safetensors", testing::raw_safetensors(header, data));
}

std::function<void(const fs::path&)> edit_bytes(std::string file, std::function<void(std::string&)> edit) {
  return [=](const fs::path& dir) {
    std::string bytes = testing::read_file(dir / file);
    edit(bytes);
    testing::write_file(dir / file, bytes);
  };
}

std::function<void(const fs::path&)> edit_json(std::string file, std::function<void(json&)> edit) {
  return [=](const fs::path& dir) {
    json j = json::parse(testing::read_file(dir / file));
    edit(j);
    testing::write_file(dir / file, j.dump(2));
  };
}

// Rewrites the checkpoint (same sharding) with an edited tensor list.
std::function<void(const fs::path&)> edit_tensors(int shards, TinyExperts experts,
                                                  std::function<void(std::vector<TensorSpec>&)> edit) {
  return [=](const fs::path& dir) {
    std::vector<TensorSpec> specs = testing::tiny_gpt_oss_tensors(experts);
    edit(specs);
    testing::write_checkpoint(dir, testing::kTinyConfig, specs, shards);
  };
}

TensorSpec& find(std::vector<TensorSpec>& specs, const std::string& name) {
  for (TensorSpec& s : specs) {
    if (s.name == name) return s;
  }
  throw std::logic_error("no tensor " + name + " in the tiny checkpoint");
}

void remove(std::vector<TensorSpec>& specs, const std::string& name) {
  find(specs, name);
  std::erase_if(specs, [&](const TensorSpec& s) { return s.name == name; });
}

// Shard 2 rewritten to also carry a tensor that the index places in shard 1.
void duplicate_across_shards(const fs::path& dir) {
  auto second = SafetensorsFile::open((dir / kShard2).string());
  SafetensorsWriter w;
  for (const auto& [name, t] : second->tensors()) w.add(name, t.dtype, t.shape, {t.data, t.nbytes});
  const TensorSpec embed{"model.embed_tokens.weight", DType::BF16, {128, 64}};
  w.add(embed.name, embed.dtype, embed.shape, testing::pattern_bytes(embed));
  second.reset();
  w.write((dir / kShard2).string());
}

const std::string kF32Pair = R"({"dtype":"F32","shape":[2],"data_offsets":)";

const Damage kDamages[] = {
    // The safetensors container.
    {"empty_file", 1, replace_file("model.safetensors", ""), {"model.safetensors", "0 bytes"}},
    {"truncated_file", 1, edit_bytes("model.safetensors", [](std::string& b) { b.resize(b.size() - 100); }),
     {"model.safetensors", "model.norm.weight", "past the end", "truncated"}},
    {"header_length_past_end", 1,
     edit_bytes("model.safetensors", [](std::string& b) { b[5] = 1; }),  // + 2^40 bytes
     {"model.safetensors", "header length", "larger than"}},
    {"header_not_json", 1, raw_model(R"({"w": {"dtype": "F32", )", ""), {"model.safetensors", "not valid JSON"}},
    {"header_not_object", 1, raw_model("[1, 2]", ""), {"model.safetensors", "not an object"}},
    {"offsets_past_end", 1, raw_model(R"({"w":)" + kF32Pair + "[0,8]}}", "1234"),
     {"model.safetensors", "tensor w", "[0, 8]", "past the end"}},
    {"offsets_not_matching_dtype_times_shape", 1,
     raw_model(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "12345678"),
     {"model.safetensors", "tensor w", "hold 8 bytes", "F32 [3] needs 12"}},
    {"offsets_backwards", 1, raw_model(R"({"w":)" + kF32Pair + "[8,0]}}", "12345678"),
     {"model.safetensors", "tensor w", "backwards"}},
    {"overlapping_tensors", 1,
     raw_model(R"({"a":)" + kF32Pair + R"([0,8]},"b":)" + kF32Pair + "[4,12]}}", "123456789012"),
     {"model.safetensors", "tensors a [0, 8] and b [4, 12] overlap"}},
    {"unknown_dtype", 1, raw_model(R"({"w":{"dtype":"F8_XYZ","shape":[1],"data_offsets":[0,1]}})", "1"),
     {"model.safetensors", "tensor w", "unknown dtype \"F8_XYZ\""}},
    {"negative_dimension", 1, raw_model(R"({"w":{"dtype":"U8","shape":[-2],"data_offsets":[0,0]}})", ""),
     {"model.safetensors", "tensor w", "negative dimension"}},
    {"duplicate_name", 1, raw_model(R"({"w":)" + kF32Pair + R"([0,8]},"w":)" + kF32Pair + "[8,16]}}",
                                    std::string(16, 'x')),
     {"model.safetensors", "tensor w appears twice"}},
    {"metadata_not_strings", 1, raw_model(R"({"__metadata__":{"step":3}})", ""),
     {"model.safetensors", "__metadata__", "step"}},

    // Tensors against the config.
    {"missing_tensor", 1,
     edit_tensors(1, TinyExperts::Mxfp4, [](auto& s) { remove(s, "model.layers.1.self_attn.sinks"); }),
     {"model.layers.1.self_attn.sinks missing", "model.safetensors"}},
    {"wrong_shape", 2,
     edit_tensors(2, TinyExperts::Mxfp4,
                  [](auto& s) { find(s, "model.layers.0.self_attn.q_proj.weight").shape = {128, 64}; }),
     {"model.layers.0.self_attn.q_proj.weight has shape [128, 64], expected [256, 64] (config.json: "
      "num_attention_heads 4 x head_dim 64, hidden_size 64) in",
      kShard1}},
    {"wrong_dtype", 1,
     edit_tensors(1, TinyExperts::Dense, [](auto& s) { find(s, "model.layers.1.mlp.router.weight").dtype = DType::F16; }),
     {"model.layers.1.mlp.router.weight has dtype F16, expected BF16 or F32", "model.safetensors"}},
    {"wrong_mxfp4_block_shape", 1,
     edit_tensors(1, TinyExperts::Mxfp4,
                  [](auto& s) { find(s, "model.layers.0.mlp.experts.down_proj_blocks").shape = {4, 64, 4, 16}; }),
     {"model.layers.0.mlp.experts.down_proj_blocks has shape [4, 64, 4, 16], expected [4, 64, 2, 16]",
      "intermediate_size 64 / 32", "model.safetensors"}},
    {"wrong_scales_dtype", 1,
     edit_tensors(1, TinyExperts::Mxfp4,
                  [](auto& s) { find(s, "model.layers.1.mlp.experts.gate_up_proj_scales").dtype = DType::BF16; }),
     {"model.layers.1.mlp.experts.gate_up_proj_scales has dtype BF16, expected U8", "model.safetensors"}},
    {"half_quantised_layer", 1,
     edit_tensors(1, TinyExperts::Mxfp4,
                  [](auto& s) {
                    remove(s, "model.layers.1.mlp.experts.down_proj_blocks");
                    remove(s, "model.layers.1.mlp.experts.down_proj_scales");
                    s.push_back({"model.layers.1.mlp.experts.down_proj", DType::BF16, {4, 64, 64}});
                  }),
     {"model.layers.1.mlp.experts.down_proj_blocks missing", "model.safetensors"}},
    {"layer_without_experts", 1,
     edit_tensors(1, TinyExperts::Dense, [](auto& s) { remove(s, "model.layers.0.mlp.experts.gate_up_proj"); }),
     {"neither model.layers.0.mlp.experts.gate_up_proj_blocks (MXFP4) nor model.layers.0.mlp.experts.gate_up_proj"}},
    {"more_layers_than_config", 1,
     edit_json("config.json",
               [](json& j) {
                 j["num_hidden_layers"] = 1;
                 j["layer_types"] = {"sliding_attention"};
               }),
     {"model.layers.1.", "model.safetensors", "num_hidden_layers 1"}},

    // The index and its shards.
    {"index_points_to_missing_shard", 2, [](const fs::path& dir) { fs::remove(dir / kShard2); },
     {"model.safetensors.index.json", "weight_map puts model.", kShard2, "does not exist"}},
    {"index_names_tensor_absent_from_shard", 2,
     edit_json("model.safetensors.index.json", [](json& j) { j["weight_map"]["model.extra.weight"] = kShard1; }),
     {"tensor model.extra.weight missing from", kShard1, "model.safetensors.index.json"}},
    {"index_not_json", 2, replace_file("model.safetensors.index.json", "{\"weight_map\": "),
     {"model.safetensors.index.json", "not valid JSON"}},
    {"index_escapes_folder", 2,
     edit_json("model.safetensors.index.json",
               [](json& j) { j["weight_map"]["lm_head.weight"] = "../model-00001-of-00002.safetensors"; }),
     {"model.safetensors.index.json", "lm_head.weight", "not a plain file name"}},
    {"tensor_in_two_shards", 2, duplicate_across_shards,
     {"model.embed_tokens.weight appears in both", kShard1, kShard2}},
    {"no_weights", 1, [](const fs::path& dir) { fs::remove(dir / "model.safetensors"); },
     {"neither model.safetensors nor model.safetensors.index.json"}},

    // config.json.
    {"config_missing_field", 1, edit_json("config.json", [](json& j) { j.erase("hidden_size"); }),
     {"config.json", "missing required field \"hidden_size\""}},
    {"config_not_json", 1, replace_file("config.json", "{\"hidden_size\": 64,"),
     {"config.json", "not valid JSON"}},
    {"config_inconsistent_heads", 1, edit_json("config.json", [](json& j) { j["num_key_value_heads"] = 3; }),
     {"config.json", "num_attention_heads 4 is not a multiple of num_key_value_heads 3"}},
    {"config_missing", 1, [](const fs::path& dir) { fs::remove(dir / "config.json"); },
     {"config.json missing", "not a Hugging Face checkpoint folder"}},
    {"folder_missing", 1, [](const fs::path& dir) { fs::remove_all(dir); }, {"does not exist"}},
};

class Malformed : public ::testing::TestWithParam<Damage> {};

TEST_P(Malformed, FailsNamingFileAndTensor) {
  const Damage& d = GetParam();
  testing::ScratchDir scratch;
  const fs::path dir = scratch.path() / "ckpt";
  testing::write_checkpoint(dir, testing::kTinyConfig, testing::tiny_gpt_oss_tensors(TinyExperts::Mxfp4),
                            d.shards);
  ASSERT_NO_THROW(load(dir)) << "the undamaged checkpoint must load";
  d.apply(dir);
  try {
    load(dir);
    FAIL() << "damage not detected";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(dir.string())) << "the message must say where";
    for (const std::string& s : d.must_mention) EXPECT_THAT(e.what(), HasSubstr(s));
  }
}

INSTANTIATE_TEST_SUITE_P(Checkpoint, Malformed, ::testing::ValuesIn(kDamages),
                         [](const ::testing::TestParamInfo<Damage>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ossrl
