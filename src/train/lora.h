// LoRA adapters for gpt-oss, PEFT-compatible in shapes, scaling and initialisation, plus
// optional full training of the attention sinks and the MoE router. The base weights stay
// frozen in the checkpoint's encoding (bf16 or MXFP4 views); only the adapters, and the
// sinks/router copies when trained, are fp32.
//
// Every trainable tensor is one Parameter in a flat list, in a fixed order (layer by
// layer; within a layer q, k, v, o, sinks, router weight, router bias, then per expert
// gate_up, down; lora_A before lora_B), so an optimiser iterates (data, grad) spans and
// the PEFT adapter writer maps names.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/cpu/lora.h"
#include "model/weights.h"

namespace ossrl {

// What LoRA adapts. Names as in PEFT's target_modules for gpt-oss.
enum class LoraTarget {
  QProj,       // "q_proj"       self_attn.q_proj  [heads*head_dim, hidden]
  KProj,       // "k_proj"       self_attn.k_proj  [kv_heads*head_dim, hidden]
  VProj,       // "v_proj"       self_attn.v_proj  [kv_heads*head_dim, hidden]
  OProj,       // "o_proj"       self_attn.o_proj  [hidden, heads*head_dim]
  GateUpProj,  // "gate_up_proj" mlp.experts.gate_up_proj, one A/B per expert [2*intermediate, hidden]
  DownProj,    // "down_proj"    mlp.experts.down_proj, one A/B per expert [hidden, intermediate]
};

struct LoraConfig {
  int r = 8;
  double lora_alpha = 16.0;
  // Probability of zeroing an adapter input (PEFT's lora_dropout; 0 disables). Masks are
  // a hash of (seed, the forward's dropout step, layer, module, expert, token, feature).
  double lora_dropout = 0.0;
  // Any of "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"; "experts"
  // stands for both expert matrices. validate() rejects anything else.
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  bool use_rslora = false;   // scale lora_alpha / sqrt(r) instead of lora_alpha / r
  bool train_sinks = false;  // full fp32 copies of self_attn.sinks, trained
  bool train_router = false; // full fp32 copies of mlp.router.weight and .bias, trained
  uint64_t seed = 0;         // initialisation of every lora_A, and dropout masks

  // lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
  float scaling() const;
  // The parsed target set; throws an Error naming an unknown module or a bad r/alpha/dropout.
  std::vector<LoraTarget> targets() const;
  void validate() const { (void)targets(); }
};

// One trainable tensor. data and grad have the same length (product of shape).
struct Parameter {
  enum class Kind { LoraA, LoraB, Sinks, RouterWeight, RouterBias };
  // PEFT-style unique name: "model.layers.3.self_attn.q_proj.lora_A.weight",
  // "model.layers.3.mlp.experts.5.down_proj.lora_B.weight" (expert 5),
  // "model.layers.3.self_attn.sinks", "model.layers.3.mlp.router.weight" / ".bias".
  std::string name;
  // The adapted module's path: "model.layers.3.self_attn.q_proj",
  // "model.layers.3.mlp.experts.gate_up_proj" (for every expert), "model.layers.3.self_attn"
  // (sinks), "model.layers.3.mlp.router".
  std::string module;
  Kind kind = Kind::LoraA;
  int layer = 0;
  int expert = -1;       // the expert of a per-expert adapter, else -1
  LoraTarget target{};   // for LoraA / LoraB
  // lora_A [r, in], lora_B [out, r] (PEFT's nn.Linear weight shapes: y += scale·x·Aᵀ·Bᵀ),
  // sinks [heads], router weight [experts, hidden], router bias [experts].
  std::vector<int64_t> shape;
  std::vector<float> data;
  std::vector<float> grad;

  int64_t numel() const { return int64_t(data.size()); }
};

// The adapters of one model. Not copyable (views into it are handed out); movable.
class Lora {
 public:
  // Builds and initialises every parameter for `base`: lora_A kaiming-uniform(a=sqrt(5))
  // as PEFT (uniform in ±1/sqrt(in)) from config.seed, lora_B zeros; sinks and router
  // copies start at the checkpoint's values. Throws an Error on an invalid config.
  Lora(const GptOssConfig& model, const GptOssWeights& base, const LoraConfig& config);
  // The same for a model whose weights are not on the host (a random GPU model): trained
  // sinks start at zero for the caller to fill; train_router is an Error.
  Lora(const GptOssConfig& model, const LoraConfig& config);
  Lora(const Lora&) = delete;
  Lora& operator=(const Lora&) = delete;
  Lora(Lora&&) = default;
  Lora& operator=(Lora&&) = default;

  const LoraConfig& config() const { return config_; }
  std::span<Parameter> parameters() { return params_; }
  std::span<const Parameter> parameters() const { return params_; }
  // Total trainable values.
  int64_t numel() const;
  // Sets every grad to 0.
  void zero_grad();

  // Off: the model computes exactly the base checkpoint (adapters, trained sinks and router
  // all ignored): the reference policy of the KL term, with no second copy of the weights.
  bool adapters_enabled() const { return enabled_; }
  void set_adapters_enabled(bool on) { enabled_ = on; }

  // The views the CPU decoder reads for layer l, with grads wired to the parameters.
  // dropout_step keys the dropout masks (a forward and its backward use the same step);
  // apply_dropout false (or lora_dropout 0) disables dropout. Null when adapters are
  // disabled: callers pass it straight to the decoder.
  const LayerAdapters* layer(int l) const { return enabled_ ? &layers_[size_t(l)] : nullptr; }
  void set_dropout(bool apply_dropout, uint64_t dropout_step);

 private:
  Lora(const GptOssConfig& model, const GptOssWeights* base, const LoraConfig& config);
  void wire_views();

  LoraConfig config_;
  GptOssConfig model_;
  std::vector<Parameter> params_;
  std::vector<LayerAdapters> layers_;
  bool enabled_ = true;
};

}  // namespace ossrl
