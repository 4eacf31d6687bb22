// Training data: JSONL, one example per line, rendered to Harmony prompt tokens once at load.
//
//   {"prompt": "What is 2+3?", "answer": "5"}
//   {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+3?"}],
//    "answer": "5"}
//   {"prompt": "2+3", "completion": "5"}                      (sft)
//
// `prompt` is a user message's text or a list of Harmony messages (harmony::
// conversation_from_json). `completion` (sft only) is the final answer's text, or a list of
// assistant messages (e.g. analysis then final); it is rendered as the model would write it,
// ending in <|return|>. Every other field goes to the reward functions as RewardInput::fields.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/harmony.h"
#include "tokenizer/tokenizer.h"

namespace ossrl {

// How rows become prompt tokens.
struct PromptFormat {
  bool system_message = true;  // Harmony's system message (identity, reasoning effort)
  harmony::ReasoningEffort effort = harmony::ReasoningEffort::Low;
  // Text prefilled after `<|start|>assistant`, special tokens by name (e.g.
  // "<|channel|>final<|message|>"): the prompt ends with it, the completion continues it.
  std::string assistant_prefix{};
  int max_prompt_length = 512;  // longer prompts keep their last tokens, as TRL truncates
};

struct Example {
  std::vector<int32_t> prompt;      // ends with <|start|>assistant and the assistant prefix
  std::string prompt_text;          // the same, decoded (special tokens by name)
  std::vector<int32_t> completion;  // sft target after the prefix, ending in <|return|>; else empty
  nlohmann::json fields;            // the row without "prompt" and "completion"
  int64_t line = 0;                 // 1-based line of the file, for messages
};

// One row. `source` ("data.jsonl:12") names it in errors. need_completion: sft rows must
// have a `completion`.
Example make_example(const nlohmann::json& row, const Tokenizer& tokenizer, const PromptFormat& format,
                     bool need_completion, const std::string& source);

// Every non-blank line of a JSONL file; an Error names the file and line of a bad row.
std::vector<Example> load_dataset(const std::string& path, const Tokenizer& tokenizer, const PromptFormat& format,
                                  bool need_completion);

// Holds out round(eval_fraction * n) examples, chosen by a shuffle seeded with `seed`; both
// parts keep the file's order.
struct DatasetSplit {
  std::vector<Example> train, eval;
};
DatasetSplit split_dataset(std::vector<Example> all, double eval_fraction, uint64_t seed);

// The order training draws examples in. Draw k (counted from the start of training, over
// all epochs) is permutation(k / n)[k % n], each epoch's permutation a Fisher-Yates shuffle
// seeded by (seed, epoch): a pure function of k, so the whole data position is one integer.
class DataOrder {
 public:
  DataOrder(size_t n, uint64_t seed);
  size_t at(int64_t k);  // index of draw k in [0, n)
  size_t size() const { return n_; }

 private:
  size_t n_;
  uint64_t seed_;
  int64_t epoch_ = -1;  // the epoch `perm_` holds
  std::vector<size_t> perm_;
};

// A deterministic 64-bit key from parts (splitmix64 chained): seeds every random stream of
// the trainer from (seed, purpose, step, ...), so nothing depends on call order.
uint64_t mix_seed(std::initializer_list<uint64_t> parts);

}  // namespace ossrl
