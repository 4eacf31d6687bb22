#include "train/lora.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "core/error.h"

namespace ossrl {

namespace {

const char* target_name(LoraTarget t) {
  switch (t) {
    case LoraTarget::QProj: return "q_proj";
    case LoraTarget::KProj: return "k_proj";
    case LoraTarget::VProj: return "v_proj";
    case LoraTarget::OProj: return "o_proj";
    case LoraTarget::GateUpProj: return "gate_up_proj";
    case LoraTarget::DownProj: return "down_proj";
  }
  return "?";
}

}  // namespace

float LoraConfig::scaling() const {
  return float(use_rslora ? lora_alpha / std::sqrt(double(r)) : lora_alpha / double(r));
}

std::vector<LoraTarget> LoraConfig::targets() const {
  OSSRL_CHECK(r > 0, "LoRA rank r must be positive, got {}", r);
  OSSRL_CHECK(lora_alpha > 0, "lora_alpha must be positive, got {}", lora_alpha);
  OSSRL_CHECK(lora_dropout >= 0 && lora_dropout < 1, "lora_dropout must be in [0, 1), got {}",
              lora_dropout);
  std::vector<LoraTarget> out;
  auto add = [&](LoraTarget t) {
    if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
  };
  for (const std::string& name : target_modules) {
    if (name == "experts") {
      add(LoraTarget::GateUpProj);
      add(LoraTarget::DownProj);
      continue;
    }
    bool known = false;
    for (LoraTarget t : {LoraTarget::QProj, LoraTarget::KProj, LoraTarget::VProj, LoraTarget::OProj,
                         LoraTarget::GateUpProj, LoraTarget::DownProj}) {
      if (name == target_name(t)) {
        add(t);
        known = true;
      }
    }
    OSSRL_CHECK(known,
                "LoRA target module '{}' is not one of q_proj, k_proj, v_proj, o_proj, gate_up_proj, "
                "down_proj, experts",
                name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

Lora::Lora(const GptOssConfig& model, const GptOssWeights& base, const LoraConfig& config) : Lora(model, &base, config) {}

Lora::Lora(const GptOssConfig& model, const LoraConfig& config) : Lora(model, nullptr, config) {}

Lora::Lora(const GptOssConfig& model, const GptOssWeights* base, const LoraConfig& config)
    : config_(config), model_(model) {
  OSSRL_CHECK(base != nullptr || !config_.train_router, "LoRA: train_router needs the checkpoint's router weights");
  const std::vector<LoraTarget> targets = config_.targets();
  auto has = [&](LoraTarget t) { return std::find(targets.begin(), targets.end(), t) != targets.end(); };
  const int64_t hidden = model.hidden_size;
  const int64_t q_dim = int64_t(model.num_attention_heads) * model.head_dim;
  const int64_t kv_dim = int64_t(model.num_key_value_heads) * model.head_dim;
  const int64_t inter = model.intermediate_size;
  const int64_t r = config_.r;
  std::mt19937_64 rng(config_.seed);

  auto add_param = [&](std::string name, std::string module, Parameter::Kind kind, int l, int expert,
                       std::vector<int64_t> shape) -> Parameter& {
    Parameter& p = params_.emplace_back();
    p.name = std::move(name);
    p.module = std::move(module);
    p.kind = kind;
    p.layer = l;
    p.expert = expert;
    p.shape = std::move(shape);
    int64_t numel = 1;
    for (int64_t s : p.shape) numel *= s;
    p.data.assign(size_t(numel), 0.0f);
    p.grad.assign(size_t(numel), 0.0f);
    return p;
  };
  auto add_lora = [&](LoraTarget t, int l, int expert, const std::string& module, int64_t out, int64_t in) {
    // Per-expert adapters carry the expert in the name so every name is unique.
    const std::string stem =
        expert < 0 ? module
                   : fmt::format("model.layers.{}.mlp.experts.{}.{}", l, expert, target_name(t));
    Parameter& a = add_param(stem + ".lora_A.weight", module, Parameter::Kind::LoraA, l, expert, {r, in});
    a.target = t;
    // kaiming_uniform_(a=sqrt(5)) on [r, in]: gain sqrt(2/(1+5)), bound gain*sqrt(3/in) = 1/sqrt(in).
    const float bound = float(1.0 / std::sqrt(double(in)));
    std::uniform_real_distribution<float> dist(-bound, bound);
    for (float& v : a.data) v = dist(rng);
    Parameter& b = add_param(stem + ".lora_B.weight", module, Parameter::Kind::LoraB, l, expert, {out, r});
    b.target = t;
  };

  for (int l = 0; l < model.num_hidden_layers; ++l) {
    const std::string attn = fmt::format("model.layers.{}.self_attn", l);
    const std::string mlp = fmt::format("model.layers.{}.mlp", l);
    if (has(LoraTarget::QProj)) add_lora(LoraTarget::QProj, l, -1, attn + ".q_proj", q_dim, hidden);
    if (has(LoraTarget::KProj)) add_lora(LoraTarget::KProj, l, -1, attn + ".k_proj", kv_dim, hidden);
    if (has(LoraTarget::VProj)) add_lora(LoraTarget::VProj, l, -1, attn + ".v_proj", kv_dim, hidden);
    if (has(LoraTarget::OProj)) add_lora(LoraTarget::OProj, l, -1, attn + ".o_proj", hidden, q_dim);
    if (config_.train_sinks) {
      Parameter& p = add_param(attn + ".sinks", attn, Parameter::Kind::Sinks, l, -1,
                               {int64_t(model.num_attention_heads)});
      if (base != nullptr) p.data = base->layers[size_t(l)].attn.sinks;
    }
    if (config_.train_router) {
      const int64_t e = model.num_local_experts;
      Parameter& pw = add_param(mlp + ".router.weight", mlp + ".router", Parameter::Kind::RouterWeight, l,
                                -1, {e, hidden});
      const LayerWeights& w = base->layers[size_t(l)];
      OSSRL_CHECK(!w.mlp.router.transposed, "router weight of layer {} is stored transposed", l);
      for (int64_t o = 0; o < e; ++o) w.mlp.router.decode_row(o, pw.data.data() + o * hidden);
      Parameter& pb = add_param(mlp + ".router.bias", mlp + ".router", Parameter::Kind::RouterBias, l, -1, {e});
      pb.data = w.mlp.router_bias;
    }
    for (int e = 0; e < model.num_local_experts; ++e) {
      if (has(LoraTarget::GateUpProj))
        add_lora(LoraTarget::GateUpProj, l, e, mlp + ".experts.gate_up_proj", 2 * inter, hidden);
      if (has(LoraTarget::DownProj))
        add_lora(LoraTarget::DownProj, l, e, mlp + ".experts.down_proj", hidden, inter);
    }
  }
  wire_views();
}

void Lora::wire_views() {
  layers_.assign(size_t(model_.num_hidden_layers), LayerAdapters{});
  const float scale = config_.scaling();
  for (size_t i = 0; i < params_.size(); ++i) {
    Parameter& p = params_[i];
    LayerAdapters& la = layers_[size_t(p.layer)];
    switch (p.kind) {
      case Parameter::Kind::Sinks:
        la.sinks = p.data.data();
        la.grad_sinks = p.grad.data();
        break;
      case Parameter::Kind::RouterWeight:
        la.router_weight = p.data.data();
        la.grad_router_weight = p.grad.data();
        break;
      case Parameter::Kind::RouterBias:
        la.router_bias = p.data.data();
        la.grad_router_bias = p.grad.data();
        break;
      case Parameter::Kind::LoraB:
        break;  // wired with its lora_A, which precedes it
      case Parameter::Kind::LoraA: {
        Parameter& b = params_[i + 1];
        LowRankAdapter ad;
        ad.a = p.data.data();
        ad.grad_a = p.grad.data();
        ad.b = b.data.data();
        ad.grad_b = b.grad.data();
        ad.r = int(p.shape[0]);
        ad.in = p.shape[1];
        ad.out = b.shape[0];
        ad.scale = scale;
        const size_t experts = size_t(model_.num_local_experts);
        switch (p.target) {
          case LoraTarget::QProj: la.q_proj = ad; break;
          case LoraTarget::KProj: la.k_proj = ad; break;
          case LoraTarget::VProj: la.v_proj = ad; break;
          case LoraTarget::OProj: la.o_proj = ad; break;
          case LoraTarget::GateUpProj:
            la.gate_up_proj.resize(experts);
            la.gate_up_proj[size_t(p.expert)] = ad;
            break;
          case LoraTarget::DownProj:
            la.down_proj.resize(experts);
            la.down_proj[size_t(p.expert)] = ad;
            break;
        }
        break;
      }
    }
  }
  set_dropout(false, 0);
}

void Lora::set_dropout(bool apply_dropout, uint64_t dropout_step) {
  const float p = apply_dropout ? float(config_.lora_dropout) : 0.0f;
  for (size_t l = 0; l < layers_.size(); ++l) {
    LayerAdapters& la = layers_[l];
    auto key = [&](int module, int expert) {
      return lora_dropout_key(config_.seed, dropout_step, int(l), module, expert);
    };
    LowRankAdapter* dense[] = {&la.q_proj, &la.k_proj, &la.v_proj, &la.o_proj};
    for (int m = 0; m < 4; ++m) {
      dense[m]->dropout = p;
      dense[m]->dropout_key = key(m, -1);
    }
    for (size_t e = 0; e < la.gate_up_proj.size(); ++e) {
      la.gate_up_proj[e].dropout = p;
      la.gate_up_proj[e].dropout_key = key(4, int(e));
    }
    for (size_t e = 0; e < la.down_proj.size(); ++e) {
      la.down_proj[e].dropout = p;
      la.down_proj[e].dropout_key = key(5, int(e));
    }
  }
}

int64_t Lora::numel() const {
  int64_t n = 0;
  for (const Parameter& p : params_) n += p.numel();
  return n;
}

void Lora::zero_grad() {
  for (Parameter& p : params_) std::fill(p.grad.begin(), p.grad.end(), 0.0f);
}

}  // namespace ossrl
