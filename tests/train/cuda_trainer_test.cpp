// The trainer with device = "cuda": GRPO steps whose rollouts come from the CUDA engine with
// the adapters, whose gradients come from the GPU policy, and whose AdamW runs on the host
// Lora; the first step's KL against the base model is zero, the adapters move, a checkpoint
// resumes. The demo's addition task on a random model of the demo's shape with head_dim 64
// (the GPU kernels' head size).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "cuda/gpu_test.h"
#include "model/random_checkpoint.h"
#include "train/demo_task.h"
#include "train/trainer.h"
#include "train_fixture.h"

namespace ossrl {
namespace {

std::string gpu_model() {
  static const std::string dir = [] {
    const std::string d = testing::train_fixture().dir + "/model-head64";
    GptOssConfig c = demo_model_config();
    c.head_dim = 64;
    write_random_checkpoint(d, c, {.seed = 2, .mxfp4_experts = true});
    return d;
  }();
  return dir;
}

TrainConfig gpu_config(const std::string& name) {
  TrainConfig c = testing::small_grpo_config(testing::train_fixture().dir + "/" + name);
  c.model_name_or_path = gpu_model();
  c.device = "cuda";
  c.beta = 0.04;
  c.lora.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "experts"};
  c.lora.train_sinks = true;
  return c;
}

// A GRPO step on the GPU: rollouts, the reference pass, the update. The first policy is the
// reference (lora_B = 0): k3 KL 0 up to the rounding of two forwards of the same bf16 model
// (the same kernels, in fact bit for bit). The untrained model rarely earns a reward, so the
// gradient may be zero here: SftStepsTrainTheAdapters checks that updates land.
TEST(CudaTrainer, GrpoStepRunsOnTheGpu) {
  OSSRL_REQUIRE_GPU();
  Trainer trainer(gpu_config("cuda-grpo"));
  const nlohmann::json row = trainer.step();
  EXPECT_FALSE(row["skipped"].get<bool>()) << row.dump();
  EXPECT_LT(std::fabs(row["kl"].get<double>()), 1e-6) << row.dump();
  EXPECT_TRUE(std::isfinite(row["loss"].get<double>())) << row.dump();
  EXPECT_TRUE(std::isfinite(row["entropy"].get<double>())) << row.dump();
  EXPECT_GT(row["completions/mean_length"].get<double>(), 0.0) << row.dump();
}

TrainConfig sft_config(const std::string& name) {
  TrainConfig c = gpu_config(name);
  c.trainer = "sft";
  c.beta = 0.0;
  return c;
}

// SFT steps on the GPU: gradients reach the host Lora (streamed layer by layer), AdamW moves
// the adapters, and the run goes on finite.
TEST(CudaTrainer, SftStepsTrainTheAdapters) {
  OSSRL_REQUIRE_GPU();
  Trainer trainer(sft_config("cuda-sft"));
  std::vector<std::vector<float>> before;
  for (const Parameter& p : trainer.lora().parameters()) before.push_back(p.data);
  const nlohmann::json first = trainer.step();
  EXPECT_FALSE(first["skipped"].get<bool>()) << first.dump();
  EXPECT_GT(first["grad_norm"].get<double>(), 0.0) << first.dump();
  size_t changed = 0;
  for (size_t i = 0; i < before.size(); ++i) changed += trainer.lora().parameters()[i].data != before[i];
  EXPECT_GT(changed, before.size() / 2) << "of " << before.size() << " tensors";
  while (trainer.global_step() < trainer.total_steps()) {
    const nlohmann::json row = trainer.step();
    EXPECT_FALSE(row["skipped"].get<bool>()) << row.dump();
    EXPECT_TRUE(std::isfinite(row["loss"].get<double>())) << row.dump();
  }
}

// The run of checkpoint-2 resumed to step 3 writes step 3 as a run never stopped does: the
// checkpoint's adapters go back to the GPU and train on the same examples. Not bit for bit:
// the attention backward adds dq with fp32 atomics, so the grads (hence the adapters) differ
// in their last bits between any two runs; 1e-4 relative on the loss and grad norm.
TEST(CudaTrainer, ResumedRunRepeatsTheUnbrokenOne) {
  OSSRL_REQUIRE_GPU();
  auto last_row = [](const std::string& dir) {
    std::ifstream in(dir + "/metrics.jsonl");
    nlohmann::json last;
    for (std::string line; std::getline(in, line);) {
      const nlohmann::json row = nlohmann::json::parse(line);
      if (row.contains("loss")) last = row;
    }
    return last;
  };
  TrainConfig unbroken = sft_config("cuda-unbroken");
  unbroken.max_steps = 3;
  unbroken.eval_steps = 0;
  Trainer(unbroken).train();

  TrainConfig first = unbroken;  // the same run (schedule included), stopped after checkpoint-2
  first.output_dir = testing::train_fixture().dir + "/cuda-resumed";
  {
    Trainer trainer(first);
    trainer.step();
    trainer.step();
    trainer.save(first.output_dir + "/checkpoint-2");
  }
  TrainConfig resumed = first;
  resumed.resume_from_checkpoint = first.output_dir + "/checkpoint-2";
  Trainer(resumed).train();

  const nlohmann::json a = last_row(unbroken.output_dir), b = last_row(resumed.output_dir);
  ASSERT_EQ(a["step"], 3);
  ASSERT_EQ(b["step"], 3);
  EXPECT_NEAR(a["loss"].get<double>(), b["loss"].get<double>(), 1e-4 * a["loss"].get<double>());
  EXPECT_NEAR(a["grad_norm"].get<double>(), b["grad_norm"].get<double>(), 1e-4 * a["grad_norm"].get<double>());
}

}  // namespace
}  // namespace ossrl
