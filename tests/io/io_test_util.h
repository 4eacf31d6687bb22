// Helpers shared by the io tests: a per-test scratch folder, raw safetensors bytes for
// files our writer would refuse to produce, and a tiny gpt-oss checkpoint whose tensor
// names and shapes are copied from what transformers 5.17 saves for the same config.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "io/safetensors.h"

namespace ossrl::testing {

namespace fs = std::filesystem;

// A fresh folder under gtest's temp dir, named after the running test, removed afterwards.
class ScratchDir {
 public:
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = fmt::format("ossrl_io_{}_{}_{}", info->test_suite_name(), info->name(), ::getpid());
    std::replace(name.begin(), name.end(), '/', '_');
    path_ = fs::path(::testing::TempDir()) / name;
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() { fs::remove_all(path_); }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  const fs::path& path() const { return path_; }
  std::string file(std::string_view name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

inline void write_file(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

inline std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A safetensors file built by hand: u64 little-endian header length, header, data.
inline std::string raw_safetensors(std::string_view header, std::string_view data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char(uint8_t(uint64_t(header.size()) >> (8 * i)));
  out += header;
  out += data;
  return out;
}

struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

// The transformers 5.17 config.json of a 2-layer gpt-oss (hidden 64, 4 heads of 64,
// 2 kv heads, 4 experts of intermediate 64, top-2, vocab 128), as save_pretrained wrote it.
inline constexpr std::string_view kTinyConfig = R"({
  "architectures": ["GptOssForCausalLM"],
  "attention_bias": true,
  "attention_dropout": 0.0,
  "bos_token_id": null,
  "dtype": "float32",
  "eos_token_id": null,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 64,
  "initializer_range": 0.02,
  "intermediate_size": 64,
  "layer_types": ["sliding_attention", "full_attention"],
  "max_position_embeddings": 131072,
  "model_type": "gpt_oss",
  "num_attention_heads": 4,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "num_local_experts": 4,
  "output_router_logits": false,
  "pad_token_id": null,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "rope_theta": 150000.0,
    "rope_type": "yarn",
    "truncate": false
  },
  "router_aux_loss_coef": 0.001,
  "sliding_window": 8,
  "tie_word_embeddings": false,
  "transformers_version": "5.17.0",
  "use_cache": true,
  "vocab_size": 128
})";

enum class TinyExperts { Dense, Mxfp4 };

// The tensors of the tiny config above. Dense shapes are those transformers 5.17 saved;
// the MXFP4 ones follow the released checkpoints' layout (spec §3) at this size.
inline std::vector<TensorSpec> tiny_gpt_oss_tensors(TinyExperts experts, DType dtype = DType::BF16) {
  std::vector<TensorSpec> t = {
      {"model.embed_tokens.weight", dtype, {128, 64}},
      {"model.norm.weight", dtype, {64}},
      {"lm_head.weight", dtype, {128, 64}},
  };
  for (int l = 0; l < 2; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    const std::vector<TensorSpec> layer = {
        {p + "input_layernorm.weight", dtype, {64}},
        {p + "post_attention_layernorm.weight", dtype, {64}},
        {p + "self_attn.sinks", DType::F32, {4}},
        {p + "self_attn.q_proj.weight", dtype, {256, 64}},
        {p + "self_attn.q_proj.bias", dtype, {256}},
        {p + "self_attn.k_proj.weight", dtype, {128, 64}},
        {p + "self_attn.k_proj.bias", dtype, {128}},
        {p + "self_attn.v_proj.weight", dtype, {128, 64}},
        {p + "self_attn.v_proj.bias", dtype, {128}},
        {p + "self_attn.o_proj.weight", dtype, {64, 256}},
        {p + "self_attn.o_proj.bias", dtype, {64}},
        {p + "mlp.router.weight", dtype, {4, 64}},
        {p + "mlp.router.bias", dtype, {4}},
        {p + "mlp.experts.gate_up_proj_bias", dtype, {4, 128}},
        {p + "mlp.experts.down_proj_bias", dtype, {4, 64}},
    };
    t.insert(t.end(), layer.begin(), layer.end());
    if (experts == TinyExperts::Dense) {
      t.push_back({p + "mlp.experts.gate_up_proj", dtype, {4, 64, 128}});
      t.push_back({p + "mlp.experts.down_proj", dtype, {4, 64, 64}});
    } else {
      t.push_back({p + "mlp.experts.gate_up_proj_blocks", DType::U8, {4, 128, 2, 16}});
      t.push_back({p + "mlp.experts.gate_up_proj_scales", DType::U8, {4, 128, 2}});
      t.push_back({p + "mlp.experts.down_proj_blocks", DType::U8, {4, 64, 2, 16}});
      t.push_back({p + "mlp.experts.down_proj_scales", DType::U8, {4, 64, 2}});
    }
  }
  return t;
}

// Deterministic, tensor-specific contents, so a round trip can check every byte landed
// under the right name.
inline std::vector<uint8_t> pattern_bytes(const TensorSpec& t) {
  size_t n = dtype_size(t.dtype);
  for (int64_t d : t.shape) n *= size_t(d);
  std::vector<uint8_t> bytes(n);
  const size_t seed = std::hash<std::string>()(t.name);
  for (size_t i = 0; i < n; ++i) bytes[i] = uint8_t(seed + i * 131);
  return bytes;
}

// Writes config.json and the tensors: one model.safetensors when shards == 1, else
// model-0000k-of-0000n.safetensors files (tensors dealt out in order) plus the index.
inline void write_checkpoint(const fs::path& dir, std::string_view config,
                             const std::vector<TensorSpec>& tensors, int shards = 1) {
  fs::create_directories(dir);
  write_file(dir / "config.json", config);
  if (shards == 1) {
    SafetensorsWriter w;
    for (const TensorSpec& t : tensors) w.add(t.name, t.dtype, t.shape, pattern_bytes(t));
    w.write((dir / "model.safetensors").string());
    return;
  }
  nlohmann::json weight_map = nlohmann::json::object();
  std::vector<SafetensorsWriter> writers(static_cast<size_t>(shards));
  for (size_t i = 0; i < tensors.size(); ++i) {
    const size_t s = i * size_t(shards) / tensors.size();
    writers[s].add(tensors[i].name, tensors[i].dtype, tensors[i].shape, pattern_bytes(tensors[i]));
    weight_map[tensors[i].name] = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards);
  }
  for (size_t s = 0; s < writers.size(); ++s) {
    writers[s].write((dir / fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards)).string());
  }
  const nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
  write_file(dir / "model.safetensors.index.json", index.dump(2));
}

}  // namespace ossrl::testing
