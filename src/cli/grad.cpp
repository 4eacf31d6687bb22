// `ossrl grad`: the loss and the LoRA gradients of one batch on the CPU reference, written as
// safetensors under PEFT's tensor names, for checking against PyTorch autograd through
// transformers + PEFT (scripts/fixtures/make_grad_fixtures.py writes the same files).
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <memory>

#include "cli/commands.h"
#include "cli/device_model.h"
#include "cli/options.h"
#include "core/error.h"
#include "model/cpu_model.h"
#include "train/batch_grad.h"
#include "train/peft_adapter.h"
#include "train/policy.h"
#if OSSRL_HAVE_CUDA
#include "engine/cuda_model.h"
#include "train/cuda_lora.h"
#include "train/cuda_policy.h"
#endif

namespace ossrl::cli {

namespace {

struct GradArgs {
  std::string model_dir;
  std::string adapter_dir;
  std::string batch;
  std::string loss = "sft";
  std::string loss_type = "dapo";
  std::optional<double> epsilon_high, delta;
  GrpoLossConfig grpo;
  std::string output;
  std::string device = "cpu";
};

// The batch's gradients on the GPU: the checkpoint uploaded, the adapter as a DeviceLora,
// the grads brought back into `lora` for writing.
BatchGrad gpu_batch_grad(const std::string& model_dir, Lora& lora, const CompletionBatch& batch, const LossSpec& spec) {
#if OSSRL_HAVE_CUDA
  const std::unique_ptr<CudaModel> model = CudaModel::load(model_dir);
  DeviceLora device_lora(model->weights(), lora.config());
  device_lora.upload(lora);
  CudaPolicyOptions options;
  options.max_tokens = 0;
  for (const CompletionSequence& s : batch.sequences) options.max_tokens += int(s.prompt.size() + s.completion.size());
  CudaPolicy policy(*model, &device_lora, options);
  BatchGrad result = batch_grad(policy, batch, spec);
  device_lora.download_grads(lora);
  return result;
#else
  fail("--device cuda: this ossrl was built without CUDA");
#endif
}

void run(GradArgs& args) {
  const auto start = std::chrono::steady_clock::now();
  LossSpec spec;
  spec.kind = args.loss == "grpo" ? LossKind::Grpo : LossKind::Sft;
  spec.grpo = args.grpo;
  spec.grpo.loss_type = parse_loss_type(args.loss_type);
  spec.grpo.epsilon_high = args.epsilon_high;
  spec.grpo.delta = args.delta;

  const CpuModel model(args.model_dir);
  Lora lora = load_peft_adapter(model.config(), model.weights(), args.adapter_dir);
  const CompletionBatch batch = read_completion_batch(args.batch, model.config().vocab_size);
  BatchGrad result;
  if (resolve_device(args.device) == "cuda") {
    result = gpu_batch_grad(args.model_dir, lora, batch, spec);
  } else {
    Policy policy(model, &lora);
    result = batch_grad(policy, batch, spec);
  }
  write_batch_grad(args.output, lora, result);

  const std::vector<PeftTensor> grads = peft_tensors(lora, LoraField::Grad);
  double sum_sq = 0;
  for (const PeftTensor& t : grads)
    for (float g : t.values) sum_sq += double(g) * double(g);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print(stderr, "{} loss {:.6f} over {} sequences, {} completion tokens; grad norm {:.6g} over {} tensors; {} -> {} ({})\n",
             args.loss == "grpo" ? fmt::format("grpo ({})", args.loss_type) : std::string("sft"), result.loss,
             batch.sequences.size(), result.log_probs.size(), std::sqrt(sum_sq), grads.size(),
             args.batch, args.output, format_seconds(seconds));
}

}  // namespace

Command add_grad(CLI::App& app) {
  auto args = std::make_shared<GradArgs>();
  CLI::App* command = app.add_subcommand("grad", "Loss and LoRA gradients of one batch, as safetensors (PEFT names)");
  command->add_option("--model", args->model_dir, "Checkpoint folder (config.json + *.safetensors)")
      ->required()
      ->check(CLI::ExistingDirectory);
  command->add_option("--adapter", args->adapter_dir, "PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
      ->required()
      ->check(CLI::ExistingDirectory);
  command->add_option("--batch", args->batch, "Batch JSON: {\"sequences\": [{\"prompt\", \"completion\", ...}]}")
      ->required()
      ->check(CLI::ExistingFile);
  command->add_option("--loss", args->loss, "sft: mean NLL of the completion tokens; grpo: TRL's GRPO loss")
      ->capture_default_str()
      ->check(CLI::IsMember({"sft", "grpo"}));
  command->add_option("--loss-type", args->loss_type, "GRPO normalisation")
      ->capture_default_str()
      ->check(CLI::IsMember({"grpo", "bnpo", "dr_grpo", "dapo"}));
  command->add_option("--epsilon", args->grpo.epsilon, "GRPO clip: ratio >= 1 - epsilon")->capture_default_str();
  command->add_option("--epsilon-high", args->epsilon_high, "GRPO clip: ratio <= 1 + epsilon_high (default epsilon)");
  command->add_option("--delta", args->delta, "GRPO two-sided clipping: ratio <= delta");
  command->add_option("--beta", args->grpo.beta, "GRPO KL coefficient (k3, reference = adapters disabled)")
      ->capture_default_str();
  command->add_option("--max-completion-length", args->grpo.max_completion_length, "dr_grpo's normaliser")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--output", args->output, "Output safetensors: grads, loss, log_probs")->required();
  command->add_option("--device", args->device, "cpu (the reference) or cuda (the GPU training path)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  return [args] { run(*args); };
}

}  // namespace ossrl::cli
