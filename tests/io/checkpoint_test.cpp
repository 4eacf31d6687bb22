#include "io/checkpoint.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <set>

#include "core/error.h"
#include "io_test_util.h"
#include "model/checkpoint_check.h"
#include "model/config.h"

namespace ossrl {
namespace {

using ::testing::HasSubstr;
using testing::ScratchDir;
using testing::TensorSpec;
using testing::TinyExperts;

// Every tensor comes back with its dtype, shape and bytes, whether the folder has one
// file or several shards behind an index.
void expect_round_trip(const std::string& dir, const std::vector<TensorSpec>& specs) {
  const Checkpoint ck = Checkpoint::open(dir);
  EXPECT_EQ(ck.config_path(), dir + "/config.json");
  std::vector<std::string> want_names;
  for (const TensorSpec& s : specs) want_names.push_back(s.name);
  std::sort(want_names.begin(), want_names.end());
  EXPECT_EQ(ck.names(), want_names);
  for (const TensorSpec& s : specs) {
    SCOPED_TRACE(s.name);
    ASSERT_TRUE(ck.contains(s.name));
    const TensorView& v = ck.tensor(s.name);
    EXPECT_EQ(v.dtype, s.dtype);
    EXPECT_EQ(v.shape, s.shape);
    const std::vector<uint8_t> bytes = testing::pattern_bytes(s);
    ASSERT_EQ(v.nbytes, bytes.size());
    EXPECT_EQ(std::memcmp(v.data, bytes.data(), bytes.size()), 0);
  }
}

TEST(Checkpoint, SingleFileRoundTrip) {
  ScratchDir dir;
  const auto specs = testing::tiny_gpt_oss_tensors(TinyExperts::Mxfp4);
  testing::write_checkpoint(dir.path(), testing::kTinyConfig, specs);
  expect_round_trip(dir.path().string(), specs);
}

TEST(Checkpoint, ShardedRoundTrip) {
  ScratchDir dir;
  const auto specs = testing::tiny_gpt_oss_tensors(TinyExperts::Dense, DType::F32);
  testing::write_checkpoint(dir.path(), testing::kTinyConfig, specs, 3);
  ASSERT_TRUE(std::filesystem::exists(dir.path() / "model-00003-of-00003.safetensors"));
  expect_round_trip(dir.path().string(), specs);
  // Each tensor remembers its shard, for error messages.
  const Checkpoint ck = Checkpoint::open(dir.path().string());
  EXPECT_THAT(ck.tensor(specs.front().name).file, HasSubstr("model-00001-of-00003.safetensors"));
  EXPECT_THAT(ck.tensor(specs.back().name).file, HasSubstr("model-00003-of-00003.safetensors"));
}

// The checkpoint outlives the Checkpoint object it was opened through (shards are shared).
TEST(Checkpoint, CopiesShareTheMapping) {
  ScratchDir dir;
  const auto specs = testing::tiny_gpt_oss_tensors(TinyExperts::Mxfp4);
  testing::write_checkpoint(dir.path(), testing::kTinyConfig, specs, 2);
  Checkpoint copy = [&] { return Checkpoint::open(dir.path().string()); }();
  EXPECT_EQ(copy.tensor("lm_head.weight").shape, (std::vector<int64_t>{128, 64}));
}

TEST(Checkpoint, TensorLookupNamesTensorAndFiles) {
  ScratchDir dir;
  testing::write_checkpoint(dir.path(), testing::kTinyConfig,
                            testing::tiny_gpt_oss_tensors(TinyExperts::Mxfp4), 2);
  const Checkpoint ck = Checkpoint::open(dir.path().string());
  EXPECT_FALSE(ck.contains("lm_head.bias"));
  try {
    ck.tensor("lm_head.bias");
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("lm_head.bias missing"));
    EXPECT_THAT(e.what(), HasSubstr("model-00001-of-00002.safetensors, model-00002-of-00002.safetensors"));
  }
}

TEST(CheckpointCheck, AcceptsBothExpertLayouts) {
  for (TinyExperts experts : {TinyExperts::Mxfp4, TinyExperts::Dense}) {
    for (int shards : {1, 2}) {
      ScratchDir dir;
      testing::write_checkpoint(dir.path(), testing::kTinyConfig,
                                testing::tiny_gpt_oss_tensors(experts), shards);
      const Checkpoint ck = Checkpoint::open(dir.path().string());
      const GptOssConfig config = GptOssConfig::from_file(ck.config_path());
      EXPECT_NO_THROW(validate_gpt_oss_checkpoint(ck, config));
      const ExpertLayout want = experts == TinyExperts::Mxfp4 ? ExpertLayout::Mxfp4 : ExpertLayout::Dense;
      EXPECT_EQ(detect_expert_layout(ck, 0), want);
      EXPECT_EQ(detect_expert_layout(ck, 1), want);
    }
  }
}

// Layout is per layer: a checkpoint may dequantise some layers and not others.
TEST(CheckpointCheck, MixedLayoutsPerLayer) {
  ScratchDir dir;
  std::vector<TensorSpec> specs;
  for (const TensorSpec& t : testing::tiny_gpt_oss_tensors(TinyExperts::Mxfp4)) {
    if (t.name.rfind("model.layers.1.", 0) != 0) specs.push_back(t);
  }
  for (const TensorSpec& t : testing::tiny_gpt_oss_tensors(TinyExperts::Dense)) {
    if (t.name.rfind("model.layers.1.", 0) == 0) specs.push_back(t);
  }
  testing::write_checkpoint(dir.path(), testing::kTinyConfig, specs);
  const Checkpoint ck = Checkpoint::open(dir.path().string());
  EXPECT_NO_THROW(validate_gpt_oss_checkpoint(ck, GptOssConfig::from_file(ck.config_path())));
  EXPECT_EQ(detect_expert_layout(ck, 0), ExpertLayout::Mxfp4);
  EXPECT_EQ(detect_expert_layout(ck, 1), ExpertLayout::Dense);
  EXPECT_THROW(detect_expert_layout(ck, 2), Error);
}

// With tied embeddings lm_head.weight is not needed; without attention_bias no biases are.
TEST(CheckpointCheck, OptionalTensorsFollowTheConfig) {
  ScratchDir dir;
  std::vector<TensorSpec> specs;
  for (const TensorSpec& t : testing::tiny_gpt_oss_tensors(TinyExperts::Dense)) {
    if (t.name != "lm_head.weight" && t.name.find("_proj.bias") == std::string::npos) specs.push_back(t);
  }
  testing::write_checkpoint(dir.path(), testing::kTinyConfig, specs);
  const Checkpoint ck = Checkpoint::open(dir.path().string());
  GptOssConfig config = GptOssConfig::from_file(ck.config_path());
  EXPECT_THROW(validate_gpt_oss_checkpoint(ck, config), Error);
  config.tie_word_embeddings = true;
  config.attention_bias = false;
  EXPECT_NO_THROW(validate_gpt_oss_checkpoint(ck, config));
}

// The folders transformers wrote (tests/fixtures/README.md): both config spellings, one
// file and two shards, MXFP4 and dense experts, all load and validate.
TEST(CheckpointCheck, TransformersFixtures) {
  struct Fixture {
    const char* folder;
    ExpertLayout layout;
    int layers, kv_heads, intermediate_size;
    size_t files;
  };
  for (const Fixture& f : {Fixture{"tiny-mxfp4", ExpertLayout::Mxfp4, 4, 2, 64, 2},
                           Fixture{"tiny-bf16", ExpertLayout::Dense, 4, 2, 32, 1},
                           Fixture{"tiny-mxfp4-kv1", ExpertLayout::Mxfp4, 6, 1, 96, 1}}) {
    SCOPED_TRACE(f.folder);
    const Checkpoint ck = Checkpoint::open(std::string(OSSRL_FIXTURE_DIR) + "/" + f.folder);
    const GptOssConfig config = GptOssConfig::from_file(ck.config_path());
    EXPECT_EQ(config.num_hidden_layers, f.layers);
    EXPECT_EQ(config.num_key_value_heads, f.kv_heads);
    EXPECT_EQ(config.intermediate_size, f.intermediate_size);
    EXPECT_EQ(config.rope.factor, 32.0);
    EXPECT_EQ(config.layer_types[0], AttentionType::Sliding);
    EXPECT_EQ(config.layer_types[1], AttentionType::Full);
    EXPECT_NO_THROW(validate_gpt_oss_checkpoint(ck, config));
    for (int l = 0; l < config.num_hidden_layers; ++l) EXPECT_EQ(detect_expert_layout(ck, l), f.layout);
    std::set<std::string> files;
    for (const std::string& name : ck.names()) files.insert(ck.tensor(name).file);
    EXPECT_EQ(files.size(), f.files);
  }
}

TEST(CheckpointCheck, LayerNameHelper) {
  EXPECT_EQ(layer_tensor_name(3, "self_attn.sinks"), "model.layers.3.self_attn.sinks");
}

}  // namespace
}  // namespace ossrl
