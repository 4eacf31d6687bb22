#include "tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "tokenizer/golden.h"

namespace ossrl {
namespace {

using testing::shared_tokenizer;
using Ids = std::vector<TokenId>;

std::string excerpt(const std::string& text) {
  return nlohmann::json(text.substr(0, 120)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Every golden case (strings across scripts, emoji, code, whitespace and digit runs, ~10k-char
// texts, special-token text) encodes to gpt-tokenizer's ids.
TEST(Tokenizer, MatchesGoldenVectors) {
  const auto cases = testing::read_golden();
  ASSERT_GE(cases.size(), 2000u);
  int failures = 0;
  for (const auto& c : cases) {
    Ids ids = shared_tokenizer().encode(c.text, c.special);
    if (ids != c.ids && ++failures <= 10) {
      ADD_FAILURE() << "text " << excerpt(c.text) << " (" << c.text.size() << " bytes): " << ids.size()
                    << " tokens, expected " << c.ids.size();
    }
  }
  EXPECT_EQ(failures, 0) << "of " << cases.size() << " golden cases";
}

TEST(Tokenizer, GoldenTextsRoundTrip) {
  const Tokenizer& tok = shared_tokenizer();
  for (const auto& c : testing::read_golden()) {
    ASSERT_EQ(tok.decode(tok.encode(c.text)), c.text) << excerpt(c.text);
    // With special tokens too, but for the alias, which decodes to <|endofprompt|>.
    if (c.text.find("<|reserved_200018|>") == std::string::npos) {
      ASSERT_EQ(tok.decode(tok.encode(c.text, SpecialTokens::All)), c.text) << excerpt(c.text);
    }
  }
}

// Checked by hand against the o200k_base rank file (grep the base64 of each token).
TEST(Tokenizer, KnownEncodings) {
  const Tokenizer& tok = shared_tokenizer();
  EXPECT_EQ(tok.encode(""), Ids{});
  EXPECT_EQ(tok.encode("hello world"), (Ids{24912, 2375}));      // "hello", " world"
  EXPECT_EQ(tok.encode("Hello, World!"), (Ids{13225, 11, 5922, 0}));  // "Hello" "," " World" "!"
  EXPECT_EQ(tok.encode(" "), Ids{220});
  EXPECT_EQ(tok.encode("\n"), Ids{198});
  EXPECT_EQ(tok.encode("'s"), Ids{885});
  // Digits split in threes from the left, whatever follows.
  EXPECT_EQ(tok.decode(Ids{tok.encode("1234567")[0]}), "123");
  EXPECT_EQ(tok.encode("1234567").size(), 3u);
  EXPECT_EQ(tok.token_bytes(24912), "hello");
  EXPECT_EQ(tok.token_bytes(220), " ");
}

TEST(Tokenizer, SpecialTokensOnlyWhenAllowed) {
  const Tokenizer& tok = shared_tokenizer();
  const std::string chat = "<|start|>user<|message|>Hi<|end|>";
  const Ids with_special = tok.encode(chat, SpecialTokens::All);
  EXPECT_EQ(with_special.front(), harmony_tokens::kStart);
  EXPECT_EQ(with_special.back(), harmony_tokens::kEnd);
  EXPECT_EQ(with_special, (Ids{harmony_tokens::kStart, tok.encode("user")[0], harmony_tokens::kMessage,
                               tok.encode("Hi")[0], harmony_tokens::kEnd}));
  // By default the same text is ordinary text: user content cannot forge a message boundary.
  for (TokenId id : tok.encode(chat)) EXPECT_FALSE(tok.is_special(id)) << id;
  EXPECT_EQ(tok.decode(tok.encode(chat)), chat);
  EXPECT_EQ(tok.decode(with_special), chat);

  // Names that are not o200k_harmony tokens stay text even when specials are allowed.
  for (const char* text : {"<|reserved_200002|>", "<|reserved_201088|>", "<|im_start|>", "<|END|>", "<|end"}) {
    for (TokenId id : tok.encode(text, SpecialTokens::All)) EXPECT_FALSE(tok.is_special(id)) << text;
  }
  EXPECT_EQ(tok.encode("<|<|end|>", SpecialTokens::All).back(), harmony_tokens::kEnd);
}

TEST(Tokenizer, SpecialTokenTable) {
  const Tokenizer& tok = shared_tokenizer();
  EXPECT_EQ(tok.vocab_size(), 201088);
  const std::pair<const char*, TokenId> named[] = {
      {"<|startoftext|>", harmony_tokens::kStartOfText}, {"<|endoftext|>", harmony_tokens::kEndOfText},
      {"<|return|>", harmony_tokens::kReturn},           {"<|constrain|>", harmony_tokens::kConstrain},
      {"<|channel|>", harmony_tokens::kChannel},         {"<|start|>", harmony_tokens::kStart},
      {"<|end|>", harmony_tokens::kEnd},                 {"<|message|>", harmony_tokens::kMessage},
      {"<|call|>", harmony_tokens::kCall},               {"<|endofprompt|>", harmony_tokens::kEndOfPrompt},
  };
  for (auto [name, id] : named) {
    EXPECT_EQ(tok.special(name), id) << name;
    EXPECT_EQ(tok.token_bytes(id), name);
    EXPECT_EQ(tok.encode(name, SpecialTokens::All), Ids{id}) << name;
  }
  EXPECT_EQ(harmony_tokens::kStartOfText, 199998);
  EXPECT_EQ(harmony_tokens::kEndOfPrompt, 200018);
  // o200k_harmony's reserved range covers 200018 too; that name is an alias.
  EXPECT_EQ(tok.special("<|reserved_200018|>"), 200018);
  EXPECT_EQ(tok.special("<|reserved_200000|>"), 200000);
  EXPECT_EQ(tok.special("<|reserved_201087|>"), 201087);
  EXPECT_THROW(tok.special("<|reserved_200002|>"), Error);
  EXPECT_THROW(tok.special("hello"), Error);

  for (TokenId id = 199998; id < tok.vocab_size(); ++id) {
    ASSERT_TRUE(tok.is_special(id));
    ASSERT_EQ(tok.special(tok.token_bytes(id)), id);
  }
  EXPECT_FALSE(tok.is_special(199997));
  EXPECT_FALSE(tok.is_special(0));
  EXPECT_FALSE(tok.is_special(201088));
  EXPECT_THROW(tok.token_bytes(201088), Error);
  EXPECT_THROW(tok.token_bytes(-1), Error);
  EXPECT_THROW(tok.decode(Ids{1, -5}), Error);
}

// Ill-formed UTF-8 never throws: the well-formed stretches encode exactly as they would on
// their own, each run of bad bytes becomes one byte-level piece, and decode gives the bytes back.
TEST(Tokenizer, InvalidUtf8) {
  const Tokenizer& tok = shared_tokenizer();
  const std::string bad[] = {
      "\xff", "\x80", "\xc0\xaf",  // overlong '/'
      "\xe4\xbd",                  // '你' cut short
      "\xed\xa0\x80",              // UTF-16 surrogate
      "\xf4\x90\x80\x80",          // above U+10FFFF
      "\xfe\xfe\xff",
  };
  for (const std::string& run : bad) {
    for (const auto& [before, after] : {std::pair<std::string, std::string>{"", ""}, {"abc", " def"},
                                        {"hello ", "\xf0\x9f\x98\x80 ok"}, {"  ", "  \n"}}) {
      const std::string text = before + run + after;
      Ids ids = tok.encode(text);
      EXPECT_EQ(tok.decode(ids), text);
      const Ids head = tok.encode(before), tail = tok.encode(after);
      ASSERT_GE(ids.size(), head.size() + tail.size() + 1);
      EXPECT_TRUE(std::equal(head.begin(), head.end(), ids.begin())) << excerpt(text);
      EXPECT_TRUE(std::equal(tail.rbegin(), tail.rend(), ids.rbegin())) << excerpt(text);
      EXPECT_EQ(tok.decode(std::span(ids).subspan(head.size(), ids.size() - head.size() - tail.size())), run);
    }
  }
  // Random bytes, and random cuts of valid text (a decoded token prefix often ends mid-character).
  std::mt19937 rng(7);
  const std::string valid = "héllo wörld 你好世界 😀👩🏽‍💻 مرحبا <|end|> 123456";
  for (int i = 0; i < 2000; ++i) {
    std::string text;
    if (i % 2 == 0) {
      text.resize(rng() % 64);
      for (char& c : text) c = static_cast<char>(rng());
    } else {
      size_t begin = rng() % valid.size();
      text = valid.substr(begin, rng() % (valid.size() - begin + 1));
    }
    ASSERT_EQ(tok.decode(tok.encode(text, i % 4 == 1 ? SpecialTokens::All : SpecialTokens::None)), text);
  }
}

// Long pieces (one letter, one digit class, whitespace) take the heap merge and must not stall.
TEST(Tokenizer, LongRuns) {
  const Tokenizer& tok = shared_tokenizer();
  for (const std::string& text : {std::string(1 << 20, 'a'), std::string(1 << 20, ' '),
                                  std::string(1 << 18, '\n'), std::string(100000, '!')}) {
    Ids ids = tok.encode(text);
    EXPECT_LT(ids.size(), text.size());
    EXPECT_EQ(tok.decode(ids), text);
  }
}

TEST(Tokenizer, MissingDataSaysToRunSetup) {
  try {
    Tokenizer::load("/nonexistent/o200k_base.tiktoken");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("scripts/setup.sh"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ossrl
