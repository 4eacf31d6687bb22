#include "train/train_config.h"

#include <toml++/toml.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <variant>

#include "core/error.h"
#include "train/grpo.h"
#include "train/schedule.h"
#include "tokenizer/harmony.h"

namespace ossrl {

namespace {

// One option: its name and where its value lives.
using FieldRef = std::variant<int*, int64_t*, uint64_t*, double*, bool*, std::string*, std::optional<double>*,
                              std::vector<std::string>*, std::vector<double>*, nlohmann::json*>;
struct Field {
  const char* name;
  FieldRef ref;
};

// Every option, in the order to_json writes them. The one table both readers and the
// writer use, so a new option is one line here.
std::vector<Field> fields(TrainConfig& c) {
  return {
      {"trainer", &c.trainer},
      {"model_name_or_path", &c.model_name_or_path},
      {"tokenizer", &c.tokenizer},
      {"output_dir", &c.output_dir},
      {"adapter_name_or_path", &c.adapter_name_or_path},
      {"resume_from_checkpoint", &c.resume_from_checkpoint},
      {"dataset", &c.dataset},
      {"eval_dataset", &c.eval_dataset},
      {"eval_split", &c.eval_split},
      {"system_message", &c.system_message},
      {"reasoning_effort", &c.reasoning_effort},
      {"assistant_prefix", &c.assistant_prefix},
      {"max_prompt_length", &c.max_prompt_length},
      {"max_completion_length", &c.max_completion_length},
      {"temperature", &c.temperature},
      {"top_p", &c.top_p},
      {"top_k", &c.top_k},
      {"min_p", &c.min_p},
      {"per_device_train_batch_size", &c.per_device_train_batch_size},
      {"gradient_accumulation_steps", &c.gradient_accumulation_steps},
      {"num_generations", &c.num_generations},
      {"per_device_eval_batch_size", &c.per_device_eval_batch_size},
      {"max_steps", &c.max_steps},
      {"num_train_epochs", &c.num_train_epochs},
      {"logging_steps", &c.logging_steps},
      {"save_steps", &c.save_steps},
      {"eval_steps", &c.eval_steps},
      {"seed", &c.seed},
      {"beta", &c.beta},
      {"epsilon", &c.epsilon},
      {"epsilon_high", &c.epsilon_high},
      {"loss_type", &c.loss_type},
      {"scale_rewards", &c.scale_rewards},
      {"num_iterations", &c.num_iterations},
      {"mask_truncated_completions", &c.mask_truncated_completions},
      {"rewards", &c.rewards},
      {"reward_weights", &c.reward_weights},
      {"learning_rate", &c.learning_rate},
      {"lr_scheduler_type", &c.lr_scheduler_type},
      {"warmup_ratio", &c.warmup_ratio},
      {"warmup_steps", &c.warmup_steps},
      {"weight_decay", &c.weight_decay},
      {"adam_beta1", &c.adam_beta1},
      {"adam_beta2", &c.adam_beta2},
      {"adam_epsilon", &c.adam_epsilon},
      {"max_grad_norm", &c.max_grad_norm},
      {"lora_r", &c.lora.r},
      {"lora_alpha", &c.lora.lora_alpha},
      {"lora_dropout", &c.lora.lora_dropout},
      {"lora_target_modules", &c.lora.target_modules},
      {"use_rslora", &c.lora.use_rslora},
      {"train_sinks", &c.lora.train_sinks},
      {"train_router", &c.lora.train_router},
      {"recompute_activations", &c.recompute_activations},
      {"device", &c.device},
      {"rollout_batch_size", &c.rollout_batch_size},
      {"kv_cache_gb", &c.kv_cache_gb},
      {"offload_embeddings", &c.offload_embeddings},
  };
}

Field* find_field(std::vector<Field>& all, const std::string& key) {
  for (Field& f : all) {
    if (key == f.name) return &f;
  }
  return nullptr;
}

[[noreturn]] void unknown_key(std::vector<Field>& all, const std::string& key, const std::string& source) {
  // Name the known option that shares the longest prefix: most typos are near misses.
  std::string best;
  size_t best_len = 0;
  for (const Field& f : all) {
    const std::string_view name = f.name;
    size_t n = 0;
    while (n < name.size() && n < key.size() && name[n] == key[n]) ++n;
    if (n > best_len) best_len = n, best = f.name;
  }
  fail("{}: unknown option '{}'{}", source, key, best_len >= 3 ? fmt::format(" (did you mean '{}'?)", best) : "");
}

nlohmann::json to_json_value(const toml::node& node) {
  if (const auto* t = node.as_table()) {
    nlohmann::json out = nlohmann::json::object();
    for (const auto& [k, v] : *t) out[std::string(k.str())] = to_json_value(v);
    return out;
  }
  if (const auto* a = node.as_array()) {
    nlohmann::json out = nlohmann::json::array();
    for (const toml::node& v : *a) out.push_back(to_json_value(v));
    return out;
  }
  if (const auto* v = node.as_string()) return v->get();
  if (const auto* v = node.as_integer()) return v->get();
  if (const auto* v = node.as_floating_point()) return v->get();
  if (const auto* v = node.as_boolean()) return v->get();
  fail("dates and times are not option values");
}

// Sets one field from a TOML node; `where` names the key and its source in errors.
void set_field(FieldRef ref, const toml::node& node, const std::string& where) {
  auto number = [&]() -> double {
    if (const auto* i = node.as_integer()) return double(i->get());
    if (const auto* f = node.as_floating_point()) return f->get();
    fail("{} must be a number", where);
  };
  auto integer = [&]() -> int64_t {
    const auto* i = node.as_integer();
    OSSRL_CHECK(i != nullptr, "{} must be an integer", where);
    return i->get();
  };
  auto string = [&]() -> std::string {
    const auto* s = node.as_string();
    OSSRL_CHECK(s != nullptr, "{} must be a string", where);
    return s->get();
  };
  std::visit(
      [&](auto* p) {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, int>) {
          const int64_t v = integer();
          OSSRL_CHECK(v >= INT32_MIN && v <= INT32_MAX, "{} = {} is out of range", where, v);
          *p = int(v);
        } else if constexpr (std::is_same_v<T, int64_t>) {
          *p = integer();
        } else if constexpr (std::is_same_v<T, uint64_t>) {
          const int64_t v = integer();
          OSSRL_CHECK(v >= 0, "{} must not be negative", where);
          *p = uint64_t(v);
        } else if constexpr (std::is_same_v<T, double> || std::is_same_v<T, std::optional<double>>) {
          *p = number();
        } else if constexpr (std::is_same_v<T, bool>) {
          const auto* b = node.as_boolean();
          OSSRL_CHECK(b != nullptr, "{} must be true or false", where);
          *p = b->get();
        } else if constexpr (std::is_same_v<T, std::string>) {
          *p = string();
        } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
          // A single string is a one-element list, so `--lora_target_modules q_proj` works.
          if (node.as_string()) {
            *p = {string()};
            return;
          }
          const auto* a = node.as_array();
          OSSRL_CHECK(a != nullptr, "{} must be a list of strings", where);
          p->clear();
          for (const toml::node& v : *a) {
            OSSRL_CHECK(v.as_string() != nullptr, "{} must be a list of strings", where);
            p->push_back(v.as_string()->get());
          }
        } else if constexpr (std::is_same_v<T, std::vector<double>>) {
          const auto* a = node.as_array();
          OSSRL_CHECK(a != nullptr, "{} must be a list of numbers", where);
          p->clear();
          for (const toml::node& v : *a) {
            if (const auto* i = v.as_integer()) p->push_back(double(i->get()));
            else if (const auto* f = v.as_floating_point()) p->push_back(f->get());
            else fail("{} must be a list of numbers", where);
          }
        } else {  // nlohmann::json: the reward list
          nlohmann::json v = to_json_value(node);
          if (!v.is_array()) v = nlohmann::json::array({v});
          *p = std::move(v);
        }
      },
      ref);
}

toml::table parse_toml(const std::string& text, const std::string& source) {
  try {
    return toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    const auto& at = e.source().begin;
    fail("{}:{}:{}: {}", source, at.line, at.column, e.description());
  }
}

}  // namespace

void apply_toml(TrainConfig& config, const std::string& toml_text, const std::string& source) {
  std::vector<Field> all = fields(config);
  const toml::table table = parse_toml(toml_text, source);
  for (const auto& [key, node] : table) {
    const std::string name(key.str());
    Field* f = find_field(all, name);
    if (!f) unknown_key(all, name, source);
    set_field(f->ref, node, fmt::format("{}: {}", source, name));
  }
}

void apply_overrides(TrainConfig& config, const std::vector<std::string>& args) {
  std::vector<Field> all = fields(config);
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    OSSRL_CHECK(arg.size() > 2 && arg.compare(0, 2, "--") == 0, "expected --key value, got '{}'", arg);
    std::string key = arg.substr(2), value;
    bool has_value = false;
    if (const size_t eq = key.find('='); eq != std::string::npos) {
      value = key.substr(eq + 1);
      key.resize(eq);
      has_value = true;
    }
    std::replace(key.begin(), key.end(), '-', '_');
    Field* f = find_field(all, key);
    if (!f) unknown_key(all, key, "command line");
    const bool is_bool = std::holds_alternative<bool*>(f->ref);
    if (!has_value) {
      const bool next_is_value = i + 1 < args.size() && args[i + 1].compare(0, 2, "--") != 0;
      if (is_bool && !next_is_value) {
        *std::get<bool*>(f->ref) = true;
        continue;
      }
      OSSRL_CHECK(next_is_value, "--{} needs a value", key);
      value = args[++i];
    }
    const std::string where = "--" + key;
    // A TOML value first ("1e-5", "[1, 2]", "{type = \"format\"}"); text that is not one is
    // a bare string ("grpo", "out/run1"). A list option also takes "a,b,c".
    toml::table parsed;
    bool ok = true;
    try {
      parsed = toml::parse("v = " + value);
    } catch (const toml::parse_error&) {
      ok = false;
    }
    if (!ok) {
      toml::table t;
      if (std::holds_alternative<std::vector<std::string>*>(f->ref) && value.find(',') != std::string::npos) {
        toml::array list;
        std::stringstream in(value);
        for (std::string item; std::getline(in, item, ',');) list.push_back(item);
        t.insert("v", std::move(list));
      } else {
        t.insert("v", value);
      }
      parsed = std::move(t);
    }
    set_field(f->ref, *parsed.get("v"), where);
  }
}

void TrainConfig::validate() const {
  OSSRL_CHECK(trainer == "grpo" || trainer == "sft", "trainer must be \"grpo\" or \"sft\", got \"{}\"", trainer);
  OSSRL_CHECK(!model_name_or_path.empty(), "model_name_or_path is not set (a checkpoint folder)");
  OSSRL_CHECK(!dataset.empty(), "dataset is not set (a JSONL file)");
  OSSRL_CHECK(eval_split >= 0 && eval_split < 1, "eval_split must be in [0, 1), got {}", eval_split);
  OSSRL_CHECK(eval_dataset.empty() || eval_split == 0, "give eval_dataset or eval_split, not both");
  OSSRL_CHECK(max_prompt_length > 0, "max_prompt_length must be positive");
  OSSRL_CHECK(max_completion_length > 0, "max_completion_length must be positive");
  OSSRL_CHECK(temperature >= 0, "temperature must not be negative");
  OSSRL_CHECK(top_p > 0 && top_p <= 1, "top_p must be in (0, 1]");
  OSSRL_CHECK(top_k >= 0, "top_k must not be negative");
  OSSRL_CHECK(min_p >= 0 && min_p <= 1, "min_p must be in [0, 1]");
  OSSRL_CHECK(per_device_train_batch_size > 0, "per_device_train_batch_size must be positive");
  OSSRL_CHECK(gradient_accumulation_steps > 0, "gradient_accumulation_steps must be positive");
  OSSRL_CHECK(per_device_eval_batch_size > 0, "per_device_eval_batch_size must be positive");
  OSSRL_CHECK(max_steps > 0 || num_train_epochs > 0, "set max_steps or num_train_epochs");
  OSSRL_CHECK(logging_steps > 0, "logging_steps must be positive");
  OSSRL_CHECK(save_steps >= 0 && eval_steps >= 0, "save_steps and eval_steps must not be negative");
  OSSRL_CHECK(lr() >= 0, "learning_rate must not be negative");
  OSSRL_CHECK(max_grad_norm >= 0, "max_grad_norm must not be negative");
  (void)parse_lr_schedule(lr_scheduler_type);
  (void)harmony::parse_effort(reasoning_effort);
  lora.validate();
  OSSRL_CHECK(device == "cpu" || device == "cuda", "device must be \"cpu\" or \"cuda\", got \"{}\"", device);
  OSSRL_CHECK(rollout_batch_size >= 0, "rollout_batch_size must not be negative");
  OSSRL_CHECK(kv_cache_gb >= 0, "kv_cache_gb must not be negative");
  if (device == "cuda") {
    OSSRL_CHECK(lora.lora_dropout == 0, "device = \"cuda\" trains without LoRA dropout (lora_dropout {})",
                lora.lora_dropout);
    OSSRL_CHECK(!lora.train_router, "device = \"cuda\" does not train the router (train_router)");
  }
  if (trainer == "grpo") {
    OSSRL_CHECK(num_generations >= 2, "num_generations must be at least 2 (advantages compare a group), got {}",
                num_generations);
    OSSRL_CHECK(generation_batch_size() % num_generations == 0,
                "per_device_train_batch_size * gradient_accumulation_steps ({}) must be a multiple of "
                "num_generations ({})",
                generation_batch_size(), num_generations);
    OSSRL_CHECK(num_iterations > 0, "num_iterations must be positive");
    OSSRL_CHECK(beta >= 0, "beta must not be negative");
    OSSRL_CHECK(epsilon >= 0 && epsilon_high.value_or(0) >= 0, "epsilon and epsilon_high must not be negative");
    (void)parse_loss_type(loss_type);
    (void)parse_scale_rewards(scale_rewards);
    OSSRL_CHECK(rewards.is_array() && !rewards.empty(), "rewards is empty: GRPO needs at least one reward function");
    OSSRL_CHECK(reward_weights.empty() || reward_weights.size() == rewards.size(),
                "reward_weights has {} entries for {} reward functions", reward_weights.size(), rewards.size());
  }
}

nlohmann::json TrainConfig::to_json() const {
  nlohmann::json out = nlohmann::json::object();
  TrainConfig copy = *this;  // fields() hands out mutable pointers
  for (const Field& f : fields(copy)) {
    std::visit(
        [&](auto* p) {
          using T = std::remove_pointer_t<decltype(p)>;
          if constexpr (std::is_same_v<T, std::optional<double>>) {
            out[f.name] = p->has_value() ? nlohmann::json(**p) : nlohmann::json(nullptr);
          } else {
            out[f.name] = *p;
          }
        },
        f.ref);
  }
  out["learning_rate"] = lr();
  return out;
}

TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides) {
  TrainConfig config;
  if (!path.empty()) {
    std::ifstream in(path);
    OSSRL_CHECK(in.good(), "cannot read the config file {}", path);
    std::stringstream text;
    text << in.rdbuf();
    apply_toml(config, text.str(), path);
  }
  apply_overrides(config, overrides);
  config.lora.seed = config.seed;
  config.validate();
  return config;
}

}  // namespace ossrl
