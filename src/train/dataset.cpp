#include "train/dataset.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <numeric>

#include "core/error.h"
#include "io/json_file.h"
#include "engine/sampling.h"

namespace ossrl {

using namespace harmony;

namespace {

const std::string kAssistantStart = "<|start|>assistant";

// The assistant's text after `<|start|>assistant` for an sft completion: a final answer's
// text, or a list of assistant messages, rendered for training (the last final ends in
// <|return|>).
std::string completion_text(const nlohmann::json& completion, const std::string& source) {
  Conversation conversation;
  if (completion.is_string()) {
    conversation.messages.push_back(
        {.role = Role::Assistant, .channel = "final", .content = completion.get<std::string>()});
  } else {
    OSSRL_CHECK(completion.is_array(), "{}: \"completion\" must be a string or a list of messages", source);
    conversation = conversation_from_json(completion, ReasoningEffort::Low);
    conversation.system.reset();
    for (const Message& m : conversation.messages) {
      OSSRL_CHECK(m.role == Role::Assistant, "{}: \"completion\" may hold only assistant messages", source);
    }
  }
  const std::string text = render_text(conversation, {.mode = RenderMode::Training});
  OSSRL_CHECK(text.compare(0, kAssistantStart.size(), kAssistantStart) == 0,
              "{}: the completion does not render as an assistant message", source);
  return text.substr(kAssistantStart.size());
}

}  // namespace

Example make_example(const nlohmann::json& row, const Tokenizer& tokenizer, const PromptFormat& format,
                     bool need_completion, const std::string& source) {
  OSSRL_CHECK(row.is_object(), "{}: a row must be a JSON object", source);
  const auto prompt = row.find("prompt");
  OSSRL_CHECK(prompt != row.end(), "{}: no \"prompt\" field", source);
  Conversation conversation;
  if (prompt->is_string()) {
    conversation = conversation_from_prompt(prompt->get<std::string>(), format.effort);
  } else {
    OSSRL_CHECK(prompt->is_array(), "{}: \"prompt\" must be a string or a list of messages", source);
    try {
      conversation = conversation_from_json(*prompt, format.effort);
    } catch (const Error& e) {
      fail("{}: {}", source, e.what());
    }
  }
  if (!format.system_message) conversation.system.reset();

  Example ex;
  ex.prompt = render_conversation(tokenizer, conversation, {.mode = RenderMode::Completion});
  const std::vector<int32_t> prefix = tokenizer.encode(format.assistant_prefix, SpecialTokens::All);
  ex.prompt.insert(ex.prompt.end(), prefix.begin(), prefix.end());
  if (int(ex.prompt.size()) > format.max_prompt_length) {
    ex.prompt.erase(ex.prompt.begin(), ex.prompt.end() - format.max_prompt_length);
  }
  ex.prompt_text = tokenizer.decode(ex.prompt);

  const auto completion = row.find("completion");
  if (need_completion) {
    OSSRL_CHECK(completion != row.end(), "{}: no \"completion\" field (sft needs one)", source);
    const std::string text = completion_text(*completion, source);
    OSSRL_CHECK(text.compare(0, format.assistant_prefix.size(), format.assistant_prefix) == 0,
                "{}: the completion {:?} does not begin with assistant_prefix {:?}", source, text,
                format.assistant_prefix);
    ex.completion = tokenizer.encode(text.substr(format.assistant_prefix.size()), SpecialTokens::All);
  }
  ex.fields = row;
  ex.fields.erase("prompt");
  ex.fields.erase("completion");
  return ex;
}

std::vector<Example> load_dataset(const std::string& path, const Tokenizer& tokenizer, const PromptFormat& format,
                                  bool need_completion) {
  std::ifstream in(path);
  OSSRL_CHECK(in.good(), "cannot read the dataset {}", path);
  std::vector<Example> out;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string source = fmt::format("{}:{}", path, number);
    out.push_back(make_example(parse_json_object(line, source), tokenizer, format, need_completion, source));
    out.back().line = number;
  }
  OSSRL_CHECK(!out.empty(), "the dataset {} has no rows", path);
  return out;
}

DatasetSplit split_dataset(std::vector<Example> all, double eval_fraction, uint64_t seed) {
  const size_t n = all.size();
  const size_t n_eval = size_t(std::llround(eval_fraction * double(n)));
  OSSRL_CHECK(n_eval < n, "eval_split {} leaves no training rows of {}", eval_fraction, n);
  DataOrder order(n, mix_seed({seed, 0x5b1d}));  // a stream of its own, apart from the epochs'
  std::vector<uint8_t> is_eval(n, 0);
  for (size_t i = 0; i < n_eval; ++i) is_eval[order.at(int64_t(i))] = 1;
  DatasetSplit split;
  for (size_t i = 0; i < n; ++i) (is_eval[i] ? split.eval : split.train).push_back(std::move(all[i]));
  return split;
}

DataOrder::DataOrder(size_t n, uint64_t seed) : n_(n), seed_(seed) {
  OSSRL_CHECK(n > 0, "no examples to draw from");
}

size_t DataOrder::at(int64_t k) {
  const int64_t epoch = k / int64_t(n_);
  if (epoch != epoch_) {
    perm_.resize(n_);
    std::iota(perm_.begin(), perm_.end(), size_t{0});
    SamplingRng rng(mix_seed({seed_, uint64_t(epoch)}));
    for (size_t i = n_ - 1; i > 0; --i) {
      const size_t j = std::min(i, size_t(rng.next() * double(i + 1)));
      std::swap(perm_[i], perm_[j]);
    }
    epoch_ = epoch;
  }
  return perm_[size_t(k % int64_t(n_))];
}

uint64_t mix_seed(std::initializer_list<uint64_t> parts) {
  uint64_t h = 0x243f6a8885a308d3ull;
  for (uint64_t p : parts) {
    uint64_t x = h ^ p;
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    h = x ^ (x >> 31);
  }
  return h;
}

}  // namespace ossrl
