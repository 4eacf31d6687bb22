// o200k_harmony: byte-level BPE over the o200k_base ranks (199998 tokens), the o200k
// pre-tokenisation regex (PCRE2), and the Harmony special tokens up to id 201087.
// Rank data is produced at set-up time by scripts/tokenizer/setup_data.sh. Encodings match
// OpenAI's tokenizer (tiktoken / openai-harmony); tests/tokenizer checks them against golden
// vectors. Thread-safe: one loaded Tokenizer serves every thread.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ossrl {

using TokenId = int32_t;

// Which special-token strings encode() recognises in text; everywhere else their text is
// encoded as ordinary bytes (so user text can never forge <|start|> or <|end|>).
enum class SpecialTokens { None, All };

class Tokenizer {
 public:
  // Loads the rank file written by set-up (default: $OSSRL_TOKENIZER if set, else the
  // data directory of the source tree the binary was built from).
  static std::shared_ptr<const Tokenizer> load(const std::string& path = default_path());
  static std::string default_path();

  // Any bytes encode and decode back to themselves. Ill-formed UTF-8 (which OpenAI's
  // tokenizers refuse) is encoded as the well-formed stretches would be on their own, with each
  // run of bad bytes as one byte-level piece between them.
  std::vector<TokenId> encode(std::string_view text, SpecialTokens special = SpecialTokens::None) const;
  // Concatenated bytes of the tokens; special tokens decode to their names. The bytes need not
  // be valid UTF-8: a token can end inside a character. Throws an Error for an id outside the
  // vocabulary.
  std::string decode(std::span<const TokenId> tokens) const;
  // The bytes of one token (its name for a special token).
  const std::string& token_bytes(TokenId token) const;

  // "<|start|>" -> 200006; throws an Error for a name that is not a special token.
  // 200018 has two names, <|endofprompt|> (its decoding) and <|reserved_200018|>.
  TokenId special(std::string_view name) const;
  bool is_special(TokenId token) const;
  int vocab_size() const;  // 201088

  ~Tokenizer();

 private:
  Tokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Special-token names need no data file, so the text-level Harmony code uses these too.
// The name of special token `id` in [199998, 201088): "<|start|>", "<|reserved_200001|>".
std::string special_token_name(TokenId id);
// The token `name` stands for (both names of 200018), or nullopt for any other text.
std::optional<TokenId> special_token_id(std::string_view name);

// The special tokens Harmony uses, by id (o200k_harmony).
namespace harmony_tokens {
constexpr TokenId kStartOfText = 199998;
constexpr TokenId kEndOfText = 199999;
constexpr TokenId kReturn = 200002;
constexpr TokenId kConstrain = 200003;
constexpr TokenId kChannel = 200005;
constexpr TokenId kStart = 200006;
constexpr TokenId kEnd = 200007;
constexpr TokenId kMessage = 200008;
constexpr TokenId kCall = 200012;
constexpr TokenId kEndOfPrompt = 200018;
}  // namespace harmony_tokens

}  // namespace ossrl
