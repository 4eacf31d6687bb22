// The golden vectors scripts/tokenizer/setup_data.sh writes (gpt-tokenizer's encodings), and
// the tokenizer the tests share: loading it once keeps the suite fast.
#pragma once

#include <nlohmann/json.hpp>

#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace ossrl::testing {

struct GoldenCase {
  std::string text;
  SpecialTokens special = SpecialTokens::None;
  std::vector<TokenId> ids;
};

inline std::string golden_path() { return std::string(OSSRL_DATA_DIR) + "/tokenizer_golden.jsonl"; }

inline std::vector<GoldenCase> read_golden(const std::string& path = golden_path()) {
  std::ifstream in(path);
  OSSRL_CHECK(in, "cannot open {}: run scripts/setup.sh, which writes it", path);
  std::vector<GoldenCase> cases;
  for (std::string line; std::getline(in, line);) {
    auto json = nlohmann::json::parse(line);
    GoldenCase c{json.at("text").get<std::string>(), SpecialTokens::None, json.at("ids").get<std::vector<TokenId>>()};
    if (json.value("allowed_special", "") == "all") c.special = SpecialTokens::All;
    cases.push_back(std::move(c));
  }
  return cases;
}

inline const Tokenizer& shared_tokenizer() {
  static const std::shared_ptr<const Tokenizer> tokenizer = Tokenizer::load();
  return *tokenizer;
}

}  // namespace ossrl::testing
