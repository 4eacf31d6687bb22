// LoRA adapters on disk in PEFT's format, so `PeftModel.from_pretrained(base, dir)` loads
// what ossrl trains and ossrl loads what PEFT trains. A folder holds
//
//   adapter_config.json        PEFT's LoraConfig, every key PEFT 0.21.0 writes, sorted, indent 2
//   adapter_model.safetensors  F32 tensors under PEFT's names (below), metadata {"format": "pt"}
//   ossrl_params.safetensors   only with trained sinks (see below)
//
// Names and layouts, as PEFT 0.21.0 saves them for transformers 5.17's GptOssForCausalLM
// (read off a save_pretrained on the tiny fixture model, see scripts/fixtures/make_grad_fixtures.py):
//
//   attention, target_modules q_proj/k_proj/v_proj/o_proj (lora.Linear):
//     base_model.model.model.layers.<l>.self_attn.q_proj.lora_A.weight   [r, in]
//     base_model.model.model.layers.<l>.self_attn.q_proj.lora_B.weight   [out, r]
//   experts, target_parameters mlp.experts.gate_up_proj / .down_proj (lora.ParamWrapper on
//   the 3-d parameters [E, in, out]; one wrapper per parameter, nested around the experts
//   module in parameter order, so gate_up_proj is the inner one, one "base_layer." deeper,
//   when both are targeted and the outer one otherwise):
//     base_model.model.model.layers.<l>.mlp.experts[.base_layer].lora_A.weight  [E*r, in]
//     base_model.model.model.layers.<l>.mlp.experts[.base_layer].lora_B.weight  [out, E*r]
//     Expert e's A [r, in] is rows e*r .. e*r+r-1 of lora_A; its B [out, r] is columns
//     e, E+e, 2E+e, ... of lora_B (PEFT reshapes lora_B to [out, r, E]). Its weight update
//     is scale * B_e A_e in [out, in] (gate_up: out = 2*intermediate, gate/up interleaved).
//     PEFT refuses lora_dropout != 0 on target_parameters: an adapter trained with dropout on
//     the experts loads here but not in PEFT.
//   router, modules_to_save ["router"] (a full trained copy; PEFT saves it under the
//   original module's name):
//     base_model.model.model.layers.<l>.mlp.router.weight  [E, hidden]
//     base_model.model.model.layers.<l>.mlp.router.bias    [E]
//
// Sinks: PEFT has no way to train self_attn.sinks. ParamWrapper takes 2-d and 3-d parameters
// only ("only 2d and 3d are supported") and modules_to_save=["self_attn"] would copy the
// whole attention block. Trained sinks therefore go to ossrl_params.safetensors, F32 [heads]
// under their PeftModel names, base_model.model.model.layers.<l>.self_attn.sinks; PEFT users
// copy them in after loading the adapter:
//   for k, v in safetensors.torch.load_file(dir + "/ossrl_params.safetensors").items():
//       peft_model.get_parameter(k).data.copy_(v)
// The file's presence is what marks sinks as trained when loading.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "model/config.h"
#include "model/weights.h"
#include "train/lora.h"

namespace ossrl {

inline constexpr std::string_view kPeftConfigFile = "adapter_config.json";
inline constexpr std::string_view kPeftWeightsFile = "adapter_model.safetensors";
inline constexpr std::string_view kExtraParamsFile = "ossrl_params.safetensors";
// The PEFT release whose format this writes (its adapter_config.json "peft_version").
inline constexpr std::string_view kPeftFormatVersion = "0.21.0";

// One PEFT tensor, assembled from one or more Parameters (all experts of a layer share one).
struct PeftTensor {
  std::string name;             // e.g. "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
  std::vector<int64_t> shape;
  std::vector<float> values;    // row-major, shape's product long
  bool extra = false;           // belongs in ossrl_params.safetensors (sinks), not adapter_model
};

// The Lora's parameters (field Data) or their gradients (Grad) as PEFT names and lays them
// out, sorted by name. The gradient of a PEFT tensor is laid out as the tensor.
enum class LoraField { Data, Grad };
std::vector<PeftTensor> peft_tensors(const Lora& lora, LoraField field);

// Writes dir/adapter_config.json and dir/adapter_model.safetensors (and ossrl_params.safetensors
// when sinks are trained; a stale one is removed otherwise), creating dir. Files are written
// atomically. base_model_name_or_path is recorded as PEFT records it (the base model's folder).
void save_peft_adapter(const Lora& lora, const std::string& dir, const std::string& base_model_name_or_path);

// The LoraConfig of an adapter folder: r, lora_alpha, lora_dropout, use_rslora, the targets
// (target_modules q/k/v/o_proj, target_parameters mlp.experts.gate_up_proj/down_proj),
// train_router from modules_to_save ["router"], train_sinks from ossrl_params.safetensors.
// Throws an Error naming the file and key for anything this LoRA cannot reproduce: another
// peft_type, DoRA, LoRA bias, fan_in_fan_out, rank/alpha patterns, a layer subset, regex
// target_modules, unknown target modules or parameters, other modules_to_save.
LoraConfig read_peft_config(const std::string& dir);

// Overwrites every parameter of `lora` with the folder's tensors (F32, BF16 or F16). Each
// tensor the config implies must be present with its exact shape, and nothing else may be:
// a missing, misshapen or unexpected tensor is an Error naming the file and the tensor.
void load_peft_weights(Lora& lora, const std::string& dir);

// read_peft_config + a Lora for this model + load_peft_weights.
Lora load_peft_adapter(const GptOssConfig& model, const GptOssWeights& base, const std::string& dir);

}  // namespace ossrl
