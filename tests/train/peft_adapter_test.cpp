// PEFT adapter folders: PEFT's per-expert packing, save/load round trip, reading the adapter
// PEFT itself wrote (tests/fixtures/grad-tiny-bf16/adapter, peft 0.21.0) and writing it back
// identically, and the errors for folders this LoRA cannot load.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>

#include "core/error.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "model/cpu_model.h"
#include "train/peft_adapter.h"

namespace ossrl {
namespace {

namespace fs = std::filesystem;

const std::string kModel = std::string(OSSRL_FIXTURE_DIR) + "/tiny-bf16";
const std::string kPeftWritten = std::string(OSSRL_FIXTURE_DIR) + "/grad-tiny-bf16/adapter";

std::string fresh_dir(const std::string& name) {
  const fs::path dir = fs::path(OSSRL_GENERATED_DIR) / "peft_adapter_test" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

LoraConfig full_config() {
  LoraConfig c;
  c.r = 4;
  c.lora_alpha = 8;
  c.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "experts"};
  c.train_sinks = true;
  c.train_router = true;
  return c;
}

// Distinct random values in every parameter (lora_B included), so a misplaced value shows.
void randomise(Lora& lora, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Parameter& p : lora.parameters())
    for (float& v : p.data) v = normal(rng);
}

const PeftTensor& find(const std::vector<PeftTensor>& tensors, const std::string& name) {
  for (const PeftTensor& t : tensors)
    if (t.name == name) return t;
  throw Error("no tensor " + name);
}

// PEFT's ParamWrapper reads lora_A as [E, r, in] and lora_B as [out, r, E]
// (peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight); per expert we keep A_e [r, in]
// and B_e [out, r]. Checked value by value against those reshapes.
TEST(PeftAdapter, ExpertsPackAsPeftReshapesThem) {
  CpuModel model(kModel);
  const GptOssConfig& mc = model.config();
  Lora lora(mc, model.weights(), full_config());
  randomise(lora, 1);
  const std::vector<PeftTensor> tensors = peft_tensors(lora, LoraField::Data);
  const int64_t E = mc.num_local_experts, r = 4;
  int checked = 0;
  for (const Parameter& p : lora.parameters()) {
    if (p.expert < 0 || p.layer != 2) continue;
    // Both expert parameters are targeted, so gate_up_proj's wrapper is the inner one.
    const std::string stem = std::string("base_model.model.model.layers.2.mlp.experts.") +
                             (p.target == LoraTarget::GateUpProj ? "base_layer." : "");
    if (p.kind == Parameter::Kind::LoraA) {
      const PeftTensor& a = find(tensors, stem + "lora_A.weight");
      const int64_t in = p.shape[1];
      ASSERT_EQ(a.shape, (std::vector<int64_t>{E * r, in}));
      for (int64_t j = 0; j < r; ++j)
        for (int64_t k = 0; k < in; ++k)  // lora_A.reshape(E, r, in)[e, j, k]
          ASSERT_EQ(a.values[size_t((p.expert * r + j) * in + k)], p.data[size_t(j * in + k)]);
    } else {
      const PeftTensor& b = find(tensors, stem + "lora_B.weight");
      const int64_t out = p.shape[0];
      ASSERT_EQ(b.shape, (std::vector<int64_t>{out, r * E}));
      for (int64_t o = 0; o < out; ++o)
        for (int64_t j = 0; j < r; ++j)  // lora_B.reshape(out, r, E)[o, j, e]
          ASSERT_EQ(b.values[size_t((o * r + j) * E + p.expert)], p.data[size_t(o * r + j)]);
    }
    ++checked;
  }
  EXPECT_EQ(checked, 4 * E);  // A and B of gate_up and down for every expert
  // The attention adapters and router/sinks keep their own names and shapes.
  EXPECT_EQ(find(tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").shape,
            (std::vector<int64_t>{mc.num_attention_heads * mc.head_dim, r}));
  EXPECT_EQ(find(tensors, "base_model.model.model.layers.0.mlp.router.weight").shape,
            (std::vector<int64_t>{E, mc.hidden_size}));
  EXPECT_TRUE(find(tensors, "base_model.model.model.layers.0.self_attn.sinks").extra);
}

TEST(PeftAdapter, OnlyOneExpertParameterHasNoBaseLayerInfix) {
  CpuModel model(kModel);
  LoraConfig c = full_config();
  c.target_modules = {"gate_up_proj"};
  Lora lora(model.config(), model.weights(), c);
  const std::vector<PeftTensor> tensors = peft_tensors(lora, LoraField::Data);
  EXPECT_NO_THROW(find(tensors, "base_model.model.model.layers.0.mlp.experts.lora_A.weight"));
  EXPECT_THROW(find(tensors, "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"), Error);
}

TEST(PeftAdapter, SaveLoadRoundTrip) {
  CpuModel model(kModel);
  for (bool sinks_and_router : {true, false}) {
    SCOPED_TRACE(sinks_and_router);
    LoraConfig c = full_config();
    c.train_sinks = c.train_router = sinks_and_router;
    c.lora_alpha = 12;
    c.use_rslora = true;
    Lora saved(model.config(), model.weights(), c);
    randomise(saved, 2);
    const std::string dir = fresh_dir(sinks_and_router ? "roundtrip_full" : "roundtrip_lora");
    save_peft_adapter(saved, dir, kModel);
    EXPECT_EQ(fs::exists(fs::path(dir) / kExtraParamsFile), sinks_and_router);

    const LoraConfig back = read_peft_config(dir);
    EXPECT_EQ(back.r, 4);
    EXPECT_EQ(back.lora_alpha, 12);
    EXPECT_TRUE(back.use_rslora);
    EXPECT_EQ(back.targets(), c.targets());
    EXPECT_EQ(back.train_sinks, sinks_and_router);
    EXPECT_EQ(back.train_router, sinks_and_router);

    const Lora loaded = load_peft_adapter(model.config(), model.weights(), dir);
    ASSERT_EQ(loaded.parameters().size(), saved.parameters().size());
    for (size_t i = 0; i < saved.parameters().size(); ++i) {
      ASSERT_EQ(loaded.parameters()[i].name, saved.parameters()[i].name);
      ASSERT_EQ(loaded.parameters()[i].data, saved.parameters()[i].data) << saved.parameters()[i].name;
    }
  }
}

// The folder PEFT 0.21.0 wrote (save_pretrained; README.md removed) loads, and saving it
// again writes the same tensors bit for bit and the same adapter_config.json (keys and
// values; only base_model_name_or_path is ours to choose).
TEST(PeftAdapter, ReadsAndRewritesWhatPeftWrote) {
  CpuModel model(kModel);
  const LoraConfig c = read_peft_config(kPeftWritten);
  EXPECT_EQ(c.r, 4);
  EXPECT_EQ(c.lora_alpha, 8);
  EXPECT_FLOAT_EQ(c.scaling(), 2.0f);
  EXPECT_EQ(c.targets().size(), 6u);
  EXPECT_TRUE(c.train_router);
  EXPECT_TRUE(c.train_sinks);
  Lora lora = load_peft_adapter(model.config(), model.weights(), kPeftWritten);

  const std::string dir = fresh_dir("rewritten");
  save_peft_adapter(lora, dir, "tests/fixtures/tiny-bf16");
  for (std::string_view file : {kPeftWeightsFile, kExtraParamsFile}) {
    auto theirs = SafetensorsFile::open((fs::path(kPeftWritten) / file).string());
    auto ours = SafetensorsFile::open((fs::path(dir) / file).string());
    ASSERT_EQ(ours->tensors().size(), theirs->tensors().size()) << file;
    for (const auto& [name, t] : theirs->tensors()) {
      ASSERT_TRUE(ours->contains(name)) << name;
      const TensorView& o = ours->tensor(name);
      EXPECT_EQ(o.dtype, t.dtype) << name;
      EXPECT_EQ(o.shape, t.shape) << name;
      ASSERT_EQ(o.nbytes, t.nbytes) << name;
      EXPECT_EQ(std::memcmp(o.data, t.data, t.nbytes), 0) << name;
    }
    EXPECT_EQ(ours->metadata(), theirs->metadata()) << file;
  }
  nlohmann::json theirs = read_json_file((fs::path(kPeftWritten) / kPeftConfigFile).string());
  nlohmann::json ours = read_json_file((fs::path(dir) / kPeftConfigFile).string());
  EXPECT_EQ(ours["base_model_name_or_path"], "tests/fixtures/tiny-bf16");
  ASSERT_EQ(theirs.size(), ours.size());
  for (auto& [key, value] : theirs.items()) {
    ASSERT_TRUE(ours.contains(key)) << key;
    if (key == "target_modules") {  // PEFT writes a set: order is arbitrary
      std::set<std::string> a(value.begin(), value.end()), b(ours[key].begin(), ours[key].end());
      EXPECT_EQ(a, b);
    } else {
      EXPECT_EQ(ours[key], value) << key;
    }
  }
}

// Each damaged folder fails with a message naming what is wrong.
TEST(PeftAdapter, RejectsWhatItCannotLoad) {
  CpuModel model(kModel);
  struct Case {
    std::string name;
    std::function<void(const fs::path&)> damage;
    std::string message;
  };
  auto edit_config = [](std::function<void(nlohmann::json&)> edit) {
    return [edit](const fs::path& dir) {
      nlohmann::json j = read_json_file((dir / kPeftConfigFile).string());
      edit(j);
      std::ofstream(dir / kPeftConfigFile) << j.dump(2);
    };
  };
  // Rewrites adapter_model.safetensors through `edit` on its tensors (as F32 copies).
  auto edit_weights = [](std::function<void(std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>&)> edit) {
    return [edit](const fs::path& dir) {
      std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> tensors;
      {
        auto f = SafetensorsFile::open((dir / kPeftWeightsFile).string());
        for (const auto& [name, t] : f->tensors()) {
          std::vector<float> v(size_t(t.numel()));
          std::memcpy(v.data(), t.data, t.nbytes);
          tensors[name] = {t.shape, v};
        }
      }
      edit(tensors);
      SafetensorsWriter w;
      for (const auto& [name, t] : tensors) w.add_f32(name, t.first, t.second);
      w.write((dir / kPeftWeightsFile).string());
    };
  };
  const std::string q_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
  const std::string experts_b = "base_model.model.model.layers.3.mlp.experts.lora_B.weight";
  const std::vector<Case> cases = {
      {"no config", [](const fs::path& d) { fs::remove(d / kPeftConfigFile); }, "not a PEFT adapter folder"},
      {"no weights", [](const fs::path& d) { fs::remove(d / kPeftWeightsFile); }, "adapter_model.safetensors"},
      {"dora", edit_config([](nlohmann::json& j) { j["use_dora"] = true; }), "DoRA"},
      {"regex targets", edit_config([](nlohmann::json& j) { j["target_modules"] = ".*proj"; }), "pattern"},
      {"unknown module", edit_config([](nlohmann::json& j) { j["target_modules"].push_back("lm_head"); }), "lm_head"},
      {"unknown parameter", edit_config([](nlohmann::json& j) { j["target_parameters"].push_back("mlp.router.weight"); }),
       "mlp.router.weight"},
      {"layer subset", edit_config([](nlohmann::json& j) { j["layers_to_transform"] = {0, 1}; }), "subset of layers"},
      {"rank pattern", edit_config([](nlohmann::json& j) { j["rank_pattern"] = {{"q_proj", 8}}; }), "per-module rank"},
      {"other modules_to_save", edit_config([](nlohmann::json& j) { j["modules_to_save"] = {"lm_head"}; }), "lm_head"},
      {"not lora", edit_config([](nlohmann::json& j) { j["peft_type"] = "IA3"; }), "IA3"},
      {"other rank", edit_config([](nlohmann::json& j) { j["r"] = 8; }), "for this model and r = 8"},
      {"router not trained", edit_config([](nlohmann::json& j) { j["modules_to_save"] = nullptr; }),
       "unexpected tensor 'base_model.model.model.layers.0.mlp.router.bias'"},
      {"missing tensor", edit_weights([&](auto& t) { t.erase(q_a); }), "'" + q_a + "' [4, 64] is missing"},
      {"misshapen tensor", edit_weights([&](auto& t) { t[experts_b].first = {32, 64}; }), "expected [64, 32]"},
      {"extra tensor", edit_weights([](auto& t) { t["base_model.model.lm_head.lora_A.weight"] = {{1}, {0.0f}}; }),
       "unexpected tensor 'base_model.model.lm_head.lora_A.weight'"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string dir = fresh_dir("damaged");
    for (const auto& entry : fs::directory_iterator(kPeftWritten)) fs::copy(entry.path(), dir);
    c.damage(dir);
    try {
      load_peft_adapter(model.config(), model.weights(), dir);
      ADD_FAILURE() << "loaded";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace ossrl
