#include "train/peft_adapter.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"

namespace ossrl {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Where a Parameter's values sit inside its PEFT tensor. Per-expert adapters share one tensor
// per layer: A_e is a block of rows, B_e every E-th column (PEFT's [out, r, E] reshape).
struct Placement {
  enum class Layout { Whole, ExpertRows, ExpertColumns };
  std::string name;
  std::vector<int64_t> shape;  // of the PEFT tensor
  bool extra = false;
  Layout layout = Layout::Whole;
  int64_t expert = 0, experts = 1, r = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  // Index in the PEFT tensor of the parameter's flat element i.
  int64_t index(int64_t i, int64_t param_numel) const {
    switch (layout) {
      case Layout::Whole: return i;
      case Layout::ExpertRows: return expert * param_numel + i;  // A_e [r, in]: rows e*r ..
      case Layout::ExpertColumns: {                              // B_e [out, r] -> [out, r*E]
        const int64_t o = i / r, j = i % r;
        return o * r * experts + j * experts + expert;
      }
    }
    return i;
  }
};

constexpr std::string_view kPrefix = "base_model.model.";

bool targeted(const Lora& lora, LoraTarget t) {
  const std::vector<LoraTarget> targets = lora.config().targets();
  return std::find(targets.begin(), targets.end(), t) != targets.end();
}

Placement placement(const Parameter& p, const Lora& lora, int64_t experts, bool both_expert_params) {
  Placement at;
  at.shape = p.shape;
  at.name = std::string(kPrefix) + p.name;
  at.extra = p.kind == Parameter::Kind::Sinks;
  if (p.expert < 0) return at;
  // Nested ParamWrappers: the gate_up_proj wrapper sits inside the down_proj one when both
  // are targeted, so its tensors carry one more "base_layer.".
  const bool inner = p.target == LoraTarget::GateUpProj && both_expert_params;
  const bool is_a = p.kind == Parameter::Kind::LoraA;
  at.name = fmt::format("{}model.layers.{}.mlp.experts.{}{}", kPrefix, p.layer, inner ? "base_layer." : "",
                        is_a ? "lora_A.weight" : "lora_B.weight");
  at.expert = p.expert;
  at.experts = experts;
  at.r = lora.config().r;
  if (is_a) {
    at.layout = Placement::Layout::ExpertRows;
    at.shape = {experts * p.shape[0], p.shape[1]};
  } else {
    at.layout = Placement::Layout::ExpertColumns;
    at.shape = {p.shape[0], p.shape[1] * experts};
  }
  return at;
}

// The placement of each parameter, in lora.parameters() order; experts counted from the
// per-expert parameters.
std::vector<Placement> placements(const Lora& lora) {
  int64_t experts = 0;
  for (const Parameter& p : lora.parameters()) experts = std::max<int64_t>(experts, p.expert + 1);
  const bool both = targeted(lora, LoraTarget::GateUpProj) && targeted(lora, LoraTarget::DownProj);
  std::vector<Placement> out;
  for (const Parameter& p : lora.parameters()) out.push_back(placement(p, lora, experts, both));
  return out;
}

std::string shape_str(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

void write_text_atomically(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    OSSRL_CHECK(f.good(), "{}: cannot open for writing", tmp.string());
    f << text;
    f.flush();
    OSSRL_CHECK(f.good(), "{}: write failed", tmp.string());
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  OSSRL_CHECK(!ec, "{}: cannot rename into place: {}", path.string(), ec.message());
}

// lora_alpha is an int in PEFT's config class; write it as one when it is integral.
json alpha_json(double alpha) {
  if (alpha == double(int64_t(alpha))) return int64_t(alpha);
  return alpha;
}

// The keys and values PEFT 0.21.0's LoraConfig.save_pretrained writes, with ours filled in.
json config_json(const LoraConfig& c, const std::string& base_model) {
  json target_modules = json::array(), target_parameters = json::array();
  for (LoraTarget t : c.targets()) {
    switch (t) {
      case LoraTarget::QProj: target_modules.push_back("q_proj"); break;
      case LoraTarget::KProj: target_modules.push_back("k_proj"); break;
      case LoraTarget::VProj: target_modules.push_back("v_proj"); break;
      case LoraTarget::OProj: target_modules.push_back("o_proj"); break;
      case LoraTarget::GateUpProj: target_parameters.push_back("mlp.experts.gate_up_proj"); break;
      case LoraTarget::DownProj: target_parameters.push_back("mlp.experts.down_proj"); break;
    }
  }
  json j = json::object();
  for (const char* key : {"alora_invocation_tokens", "arrow_config", "auto_mapping", "corda_config", "eva_config",
                          "exclude_modules", "kasa_config", "layer_replication", "layers_pattern",
                          "layers_to_transform", "lora_ga_config", "megatron_config", "monteclora_config",
                          "revision", "trainable_token_indices", "use_bdlora", "velora_config"})
    j[key] = nullptr;
  j["alpha_pattern"] = json::object();
  j["rank_pattern"] = json::object();
  j["loftq_config"] = json::object();
  j["base_model_name_or_path"] = base_model;
  j["bias"] = "none";
  j["ensure_weight_tying"] = false;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;  // save_pretrained always records inference mode
  j["init_lora_weights"] = true;
  j["lora_alpha"] = alpha_json(c.lora_alpha);
  j["lora_bias"] = false;
  j["lora_dropout"] = c.lora_dropout;
  j["megatron_core"] = "megatron.core";
  j["modules_to_save"] = c.train_router ? json::array({"router"}) : json(nullptr);
  j["peft_type"] = "LORA";
  j["peft_version"] = std::string(kPeftFormatVersion);
  j["qalora_group_size"] = 16;
  j["r"] = c.r;
  j["target_modules"] = target_modules.empty() ? json(nullptr) : target_modules;
  j["target_parameters"] = target_parameters.empty() ? json(nullptr) : target_parameters;
  j["task_type"] = "CAUSAL_LM";
  j["use_dora"] = false;
  j["use_qalora"] = false;
  j["use_rslora"] = c.use_rslora;
  return j;
}

std::vector<float> to_f32(const TensorView& t) {
  std::vector<float> out(size_t(t.numel()));
  switch (t.dtype) {
    case DType::F32: std::memcpy(out.data(), t.data, t.nbytes); break;
    case DType::BF16:
    case DType::F16:
      for (size_t i = 0; i < out.size(); ++i) {
        uint16_t bits;
        std::memcpy(&bits, t.data + 2 * i, 2);
        out[i] = t.dtype == DType::BF16 ? bf16_to_f32(bits) : f16_to_f32(bits);
      }
      break;
    default:
      fail("{}: tensor '{}' is {}; an adapter tensor must be F32, BF16 or F16", t.file, t.name,
           dtype_name(t.dtype));
  }
  return out;
}

}  // namespace

std::vector<PeftTensor> peft_tensors(const Lora& lora, LoraField field) {
  std::map<std::string, PeftTensor> tensors;
  const std::vector<Placement> at_all = placements(lora);
  for (size_t k = 0; k < at_all.size(); ++k) {
    const Parameter* p = &lora.parameters()[k];
    const Placement& at = at_all[k];
    PeftTensor& t = tensors[at.name];
    if (t.values.empty()) {
      t.name = at.name;
      t.shape = at.shape;
      t.values.assign(size_t(at.numel()), 0.0f);
      t.extra = at.extra;
    }
    const std::vector<float>& src = field == LoraField::Data ? p->data : p->grad;
    for (int64_t i = 0; i < p->numel(); ++i) t.values[size_t(at.index(i, p->numel()))] = src[size_t(i)];
  }
  std::vector<PeftTensor> out;
  out.reserve(tensors.size());
  for (auto& [name, t] : tensors) out.push_back(std::move(t));
  return out;
}

void save_peft_adapter(const Lora& lora, const std::string& dir, const std::string& base_model_name_or_path) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  OSSRL_CHECK(!ec, "{}: cannot create the adapter folder: {}", dir, ec.message());
  SafetensorsWriter weights, extra;
  weights.set_metadata("format", "pt");
  extra.set_metadata("format", "pt");
  bool has_extra = false;
  for (const PeftTensor& t : peft_tensors(lora, LoraField::Data)) {
    (t.extra ? extra : weights).add_f32(t.name, t.shape, t.values);
    has_extra |= t.extra;
  }
  const fs::path folder(dir);
  weights.write((folder / kPeftWeightsFile).string());
  if (has_extra) {
    extra.write((folder / kExtraParamsFile).string());
  } else {
    fs::remove(folder / kExtraParamsFile, ec);  // a stale file would mark sinks as trained
  }
  write_text_atomically(folder / kPeftConfigFile, config_json(lora.config(), base_model_name_or_path).dump(2) + "\n");
}

LoraConfig read_peft_config(const std::string& dir) {
  const fs::path path = fs::path(dir) / kPeftConfigFile;
  OSSRL_CHECK(fs::exists(path), "{}: no {} here; not a PEFT adapter folder", dir, kPeftConfigFile);
  const std::string where = path.string();
  json j;
  {
    std::ifstream f(path);
    try {
      j = json::parse(f);
    } catch (const json::exception& e) {
      fail("{}: not valid JSON ({})", where, e.what());
    }
  }
  OSSRL_CHECK(j.is_object(), "{}: expected a JSON object", where);
  auto value = [&](const char* key) -> const json& {
    static const json null_value;
    auto it = j.find(key);
    return it == j.end() ? null_value : *it;
  };
  // Settings this LoRA does not implement must be absent or at PEFT's neutral value.
  auto require_unset = [&](const char* key, const char* what) {
    const json& v = value(key);
    const bool unset = v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_object() && v.empty()) ||
                       (v.is_string() && v.get<std::string>() == "none");
    OSSRL_CHECK(unset, "{}: \"{}\" is {}; {} is not supported", where, key, v.dump(), what);
  };

  LoraConfig c;
  try {
    OSSRL_CHECK(value("peft_type") == "LORA", "{}: peft_type is {}, only LORA adapters are supported", where,
                value("peft_type").dump());
    OSSRL_CHECK(value("r").is_number_integer() && value("r").get<int>() > 0, "{}: \"r\" must be a positive integer, got {}",
                where, value("r").dump());
    c.r = value("r").get<int>();
    c.lora_alpha = value("lora_alpha").is_null() ? 8.0 : value("lora_alpha").get<double>();  // PEFT's default
    c.lora_dropout = value("lora_dropout").is_null() ? 0.0 : value("lora_dropout").get<double>();
    c.use_rslora = value("use_rslora").is_null() ? false : value("use_rslora").get<bool>();
    require_unset("use_dora", "DoRA");
    require_unset("lora_bias", "a LoRA bias");
    require_unset("bias", "training base-model biases");
    require_unset("fan_in_fan_out", "fan_in_fan_out");
    require_unset("rank_pattern", "a per-module rank");
    require_unset("alpha_pattern", "a per-module alpha");
    require_unset("layers_to_transform", "adapting a subset of layers");
    require_unset("layer_replication", "layer replication");
    require_unset("exclude_modules", "excluding modules");
    require_unset("trainable_token_indices", "training token embeddings");

    c.target_modules.clear();
    const json& modules = value("target_modules");
    OSSRL_CHECK(!modules.is_string(), "{}: target_modules is the pattern {}; list module names instead "
                "(q_proj, k_proj, v_proj, o_proj)", where, modules.dump());
    for (const json& m : modules.is_null() ? json::array() : modules) {
      const std::string name = m.get<std::string>();
      const std::string leaf = name.substr(name.rfind('.') + 1);
      OSSRL_CHECK((leaf == "q_proj" || leaf == "k_proj" || leaf == "v_proj" || leaf == "o_proj") &&
                      name.find("layers.") == std::string::npos,
                  "{}: target module '{}' is not supported; gpt-oss LoRA adapts q_proj, k_proj, v_proj, o_proj "
                  "of every layer (and the experts through target_parameters)", where, name);
      c.target_modules.push_back(leaf);
    }
    for (const json& m : value("target_parameters").is_null() ? json::array() : value("target_parameters")) {
      const std::string name = m.get<std::string>();
      bool known = false;
      for (const char* param : {"gate_up_proj", "down_proj"}) {
        // PEFT matches a parameter whose full name ends with ".<entry>".
        const std::string full = fmt::format("model.layers.0.mlp.experts.{}", param);
        if (full.size() > name.size() && full.ends_with("." + name) && name.find("layers.") == std::string::npos) {
          c.target_modules.push_back(param);
          known = true;
        }
      }
      OSSRL_CHECK(known, "{}: target parameter '{}' is not supported; use mlp.experts.gate_up_proj and/or "
                  "mlp.experts.down_proj", where, name);
    }
    OSSRL_CHECK(!c.target_modules.empty(), "{}: the adapter targets no module or parameter", where);
    for (const json& m : value("modules_to_save").is_null() ? json::array() : value("modules_to_save")) {
      const std::string name = m.get<std::string>();
      OSSRL_CHECK(name == "router" || name == "mlp.router",
                  "{}: modules_to_save '{}' is not supported; only the MoE router (\"router\") can be trained "
                  "in full", where, name);
      c.train_router = true;
    }
  } catch (const json::exception& e) {
    fail("{}: {}", where, e.what());
  }
  c.train_sinks = fs::exists(fs::path(dir) / kExtraParamsFile);
  try {
    c.validate();
  } catch (const Error& e) {
    fail("{}: {}", where, e.what());
  }
  return c;
}

void load_peft_weights(Lora& lora, const std::string& dir) {
  const fs::path folder(dir);
  const fs::path weights_path = folder / kPeftWeightsFile;
  OSSRL_CHECK(fs::exists(weights_path), "{}: no {} here; not a PEFT adapter folder (adapter_model.bin is not read: "
              "re-save it with safe_serialization)", dir, kPeftWeightsFile);
  std::unique_ptr<SafetensorsFile> weights = SafetensorsFile::open(weights_path.string());
  std::unique_ptr<SafetensorsFile> extra;
  if (lora.config().train_sinks) {
    const fs::path extra_path = folder / kExtraParamsFile;
    OSSRL_CHECK(fs::exists(extra_path), "{}: trained sinks need {} here", dir, kExtraParamsFile);
    extra = SafetensorsFile::open(extra_path.string());
  }

  // Every tensor the config implies, with its shape; each file must hold exactly those.
  const std::vector<Placement> all = placements(lora);
  std::map<std::string, const Placement*> expected;
  for (const Placement& at : all) expected.emplace(at.name, &at);
  for (const SafetensorsFile* file : {weights.get(), extra.get()}) {
    if (!file) continue;
    for (const auto& [name, view] : file->tensors()) {
      auto it = expected.find(name);
      OSSRL_CHECK(it != expected.end() && it->second->extra == (file == extra.get()),
                  "{}: unexpected tensor '{}' {}; the adapter config ({}) does not produce it. Was the adapter "
                  "made for another model or with other settings?", file->path(), name, view.shape_str(),
                  (folder / kPeftConfigFile).string());
    }
  }
  std::map<std::string, std::vector<float>> loaded;
  for (const auto& [name, at] : expected) {
    const SafetensorsFile& file = at->extra ? *extra : *weights;
    OSSRL_CHECK(file.contains(name), "{}: tensor '{}' {} is missing", file.path(), name, shape_str(at->shape));
    const TensorView& view = file.tensor(name);
    OSSRL_CHECK(view.shape == at->shape,
                "{}: tensor '{}' has shape {}, expected {} for this model and r = {}; was the adapter made "
                "for another model?", file.path(), name, view.shape_str(), shape_str(at->shape), lora.config().r);
    loaded.emplace(name, to_f32(view));
  }
  for (size_t k = 0; k < all.size(); ++k) {
    const Placement& at = all[k];
    const std::vector<float>& src = loaded.at(at.name);
    Parameter& dst = lora.parameters()[k];
    for (int64_t i = 0; i < dst.numel(); ++i) dst.data[size_t(i)] = src[size_t(at.index(i, dst.numel()))];
  }
}

Lora load_peft_adapter(const GptOssConfig& model, const GptOssWeights& base, const std::string& dir) {
  Lora lora(model, base, read_peft_config(dir));
  load_peft_weights(lora, dir);
  return lora;
}

}  // namespace ossrl
