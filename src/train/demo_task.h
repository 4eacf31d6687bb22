// `ossrl demo`: reinforcement learning you can watch on a laptop CPU. A tiny random gpt-oss
// (the real 201088-token vocabulary and Harmony format, hidden size 64) learns single-digit
// addition: a short SFT warm-up teaches the answer format and a little arithmetic, then GRPO
// with an exact-match reward raises the held-out greedy accuracy.
//
// The task: "a+b" with a + b <= 9 (55 problems), answered by one digit token and <|return|>.
// Prompts skip Harmony's long system message and prefill the final channel,
//   <|start|>user<|message|>3+5<|end|><|start|>assistant<|channel|>final<|message|>
// so a completion is two tokens: every token of the 201088-wide lm_head costs hidden·vocab
// multiply-adds, and a run of a few hundred steps has to fit in minutes on two cores.
//
// The model: write_random_checkpoint's weights, except that the lm_head rows of the answer
// tokens (the ten digits and <|return|>) are scaled by kAnswerTokenGain. With random unit-
// scale rows and a 64-wide normed state, every logit is about N(0, 1) and no state can give
// ten tokens more than a sliver of the mass against 201077 others (the log-sum-exp of the
// rest is about log(201077) + 0.5 = 12.7, while ten tokens sharing a state reach logits of
// about 8 / sqrt(10) = 2.5). A pretrained model's head carries a frequency prior that
// makes the tokens of its task reachable; a random one needs it given.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/config.h"
#include "tokenizer/tokenizer.h"

namespace ossrl {

// The 55 rows {"prompt": "3+5", "answer": "8", "completion": "8"}, a and b ascending.
std::vector<nlohmann::json> addition_rows();

// 2 layers (sliding, full), hidden 64, 4 heads of 16 (2 KV heads), 4 experts (top 2) of
// intermediate 64, MXFP4 experts: about 25.8 M parameters, nearly all in the embedding and lm_head.
GptOssConfig demo_model_config();
inline constexpr float kAnswerTokenGain = 6.0f;

// Writes the demo model to `dir` (config.json + model.safetensors), deterministic in seed.
void write_demo_model(const std::string& dir, uint64_t seed, const Tokenizer& tokenizer);

struct DemoOptions {
  std::string work_dir;             // model/, data/, sft/ and grpo/ go here
  std::string tokenizer;            // empty: the default rank file
  uint64_t seed = 1;
  int64_t sft_steps = 20;
  int64_t grpo_steps = 40;
  int64_t eval_steps = 10;
  std::vector<std::string> sft_overrides, grpo_overrides;  // "--key value" for either phase
  std::function<void(const std::string& line)> print = [](const std::string&) {};
};

// One evaluation, for the summary table.
struct DemoEval {
  std::string phase;  // "sft" or "grpo"
  int64_t step = 0;
  double accuracy = 0;  // greedy exact-match on the held-out problems
  double reward = 0;    // the weighted reward (exact match + 0.2 format)
  double train_reward = 0;  // grpo: the step's mean sampled reward; NaN for sft
  double kl = 0;            // grpo: KL to the base model at that step; NaN for sft
};

struct DemoReport {
  std::vector<DemoEval> evals;
  double accuracy_before_grpo = 0;  // after the SFT warm-up
  double accuracy_after_grpo = 0;
  double seconds = 0;
};

// Writes the model (if absent) and the data, runs SFT then GRPO (from the SFT adapter) and
// returns every evaluation. print receives the progress lines.
DemoReport run_demo(const DemoOptions& options);

}  // namespace ossrl
