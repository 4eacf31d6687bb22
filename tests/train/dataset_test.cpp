// Training data: JSONL rows to Harmony prompt tokens, sft completions, splits and the
// seeded data order.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "core/error.h"
#include "train/dataset.h"

namespace ossrl {
namespace {

using namespace harmony;

const Tokenizer& tok() {
  static const std::shared_ptr<const Tokenizer> t = Tokenizer::load();
  return *t;
}

std::string write_jsonl(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + "/ossrl_dataset_" + name + ".jsonl";
  std::ofstream(path) << text;
  return path;
}

TEST(Dataset, TextPromptRendersAsHarmony) {
  const PromptFormat format{.system_message = true, .effort = ReasoningEffort::Low};
  const Example e = make_example({{"prompt", "What is 2+3?"}, {"answer", "5"}}, tok(), format, false, "row");
  const std::string expected = render_text(conversation_from_prompt("What is 2+3?", ReasoningEffort::Low));
  EXPECT_EQ(e.prompt_text, expected);
  EXPECT_EQ(tok().decode(e.prompt), expected);
  EXPECT_EQ(e.prompt_text.substr(e.prompt_text.size() - 18), "<|start|>assistant");
  EXPECT_EQ(e.fields, (nlohmann::json{{"answer", "5"}}));
  EXPECT_TRUE(e.completion.empty());
}

TEST(Dataset, MessageListPromptPrefixAndNoSystemMessage) {
  const PromptFormat format{.system_message = false, .assistant_prefix = "<|channel|>final<|message|>"};
  const nlohmann::json row = {
      {"prompt", {{{"role", "developer"}, {"content", "Be terse."}}, {{"role", "user"}, {"content", "2+3"}}}},
      {"completion", "5"},
      {"id", 12}};
  const Example e = make_example(row, tok(), format, true, "row");
  EXPECT_EQ(e.prompt_text,
            "<|start|>developer<|message|># Instructions\n\nBe terse.<|end|><|start|>user<|message|>2+3<|end|>"
            "<|start|>assistant<|channel|>final<|message|>");
  // The completion continues the prefix and ends the turn.
  EXPECT_EQ(tok().decode(e.completion), "5<|return|>");
  EXPECT_EQ(e.completion.back(), harmony_tokens::kReturn);
  EXPECT_EQ(e.fields, (nlohmann::json{{"id", 12}}));
}

TEST(Dataset, CompletionAsMessagesAndPrefixMismatch) {
  const PromptFormat plain{.system_message = false};
  const nlohmann::json messages = {{{"role", "assistant"}, {"channel", "analysis"}, {"content", "add"}},
                                   {{"role", "assistant"}, {"channel", "final"}, {"content", "5"}}};
  const Example e = make_example({{"prompt", "2+3"}, {"completion", messages}}, tok(), plain, true, "row");
  EXPECT_EQ(tok().decode(e.completion),
            "<|channel|>analysis<|message|>add<|end|><|start|>assistant<|channel|>final<|message|>5<|return|>");
  // A completion that does not continue the prefilled prefix cannot be trained on.
  const PromptFormat prefixed{.system_message = false, .assistant_prefix = "<|channel|>final<|message|>"};
  EXPECT_THROW(make_example({{"prompt", "2+3"}, {"completion", messages}}, tok(), prefixed, true, "row"), Error);
  EXPECT_THROW(make_example({{"prompt", "2+3"}}, tok(), prefixed, true, "row"), Error);  // sft needs one
}

TEST(Dataset, LongPromptsKeepTheirEnd) {
  const PromptFormat format{.system_message = false, .max_prompt_length = 5};
  const Example e = make_example({{"prompt", "one two three four five six seven"}}, tok(), format, false, "row");
  ASSERT_EQ(e.prompt.size(), 5u);
  EXPECT_EQ(tok().decode(e.prompt).substr(tok().decode(e.prompt).size() - 18), "<|start|>assistant");
}

TEST(Dataset, FileErrorsNameTheLine) {
  const std::string path = write_jsonl("bad", "{\"prompt\": \"a\"}\n\n{\"prompt\": 3}\n");
  try {
    load_dataset(path, tok(), {}, false);
    FAIL() << "a numeric prompt was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path + ":3"), std::string::npos) << e.what();
  }
  const std::string not_json = write_jsonl("notjson", "{\"prompt\": \"a\"}\n{prompt: a}\n");
  EXPECT_THROW(load_dataset(not_json, tok(), {}, false), Error);
  const std::string good = write_jsonl("good", "{\"prompt\": \"a\"}\n\n{\"prompt\": \"b\"}\n");
  const std::vector<Example> rows = load_dataset(good, tok(), {}, false);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[1].line, 3);
}

TEST(Dataset, SplitIsSeededDisjointAndComplete) {
  std::vector<Example> all(20);
  for (int i = 0; i < 20; ++i) all[size_t(i)].line = i;
  const DatasetSplit a = split_dataset(all, 0.25, 1);
  const DatasetSplit b = split_dataset(all, 0.25, 1);
  const DatasetSplit c = split_dataset(all, 0.25, 2);
  ASSERT_EQ(a.eval.size(), 5u);
  ASSERT_EQ(a.train.size(), 15u);
  std::set<int64_t> seen;
  for (const auto* part : {&a.train, &a.eval}) {
    for (const Example& e : *part) seen.insert(e.line);
  }
  EXPECT_EQ(seen.size(), 20u);
  auto lines = [](const std::vector<Example>& v) {
    std::vector<int64_t> out;
    for (const Example& e : v) out.push_back(e.line);
    return out;
  };
  EXPECT_EQ(lines(a.eval), lines(b.eval));
  EXPECT_NE(lines(a.eval), lines(c.eval));  // 1 in C(20,5) = 15504 chance of a false failure
  const std::vector<int64_t> eval_lines = lines(a.eval);
  EXPECT_TRUE(std::is_sorted(eval_lines.begin(), eval_lines.end()));  // file order kept
  EXPECT_THROW(split_dataset(all, 0.99, 1), Error);  // nothing left to train on
}

TEST(Dataset, DataOrderIsAPermutationPerEpochAndAFunctionOfTheDraw) {
  DataOrder order(10, 5);
  std::vector<size_t> epoch0, epoch1;
  for (int64_t k = 0; k < 10; ++k) epoch0.push_back(order.at(k));
  for (int64_t k = 10; k < 20; ++k) epoch1.push_back(order.at(k));
  EXPECT_EQ(std::set<size_t>(epoch0.begin(), epoch0.end()).size(), 10u);
  EXPECT_EQ(std::set<size_t>(epoch1.begin(), epoch1.end()).size(), 10u);
  EXPECT_NE(epoch0, epoch1);
  // Random access in any order gives the same draws (what resume relies on).
  DataOrder fresh(10, 5);
  EXPECT_EQ(fresh.at(13), epoch1[3]);
  EXPECT_EQ(fresh.at(2), epoch0[2]);
  EXPECT_NE(mix_seed({1, 2}), mix_seed({2, 1}));
}

}  // namespace
}  // namespace ossrl
