// o200k_harmony encode/decode. Text is split into pieces by OpenAI's o200k regex, and each
// piece is byte-pair encoded on its own (bpe.h). Special tokens are cut out of the text first,
// only when the caller allows them.
#include "tokenizer/tokenizer.h"

#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <map>
#include <optional>
#include <utility>

#include "core/error.h"
#include "tokenizer/bpe.h"

namespace ossrl {
namespace {

constexpr TokenId kFirstSpecial = harmony_tokens::kStartOfText;  // o200k_base has 199998 ranks
constexpr TokenId kFirstReserved = 200000;
constexpr TokenId kVocabSize = 201088;

// The tokens with names of their own; every other id from 200000 on is <|reserved_{id}|>.
constexpr std::array<std::pair<TokenId, std::string_view>, 10> kNamedSpecials = {{
    {harmony_tokens::kStartOfText, "<|startoftext|>"},
    {harmony_tokens::kEndOfText, "<|endoftext|>"},
    {harmony_tokens::kReturn, "<|return|>"},
    {harmony_tokens::kConstrain, "<|constrain|>"},
    {harmony_tokens::kChannel, "<|channel|>"},
    {harmony_tokens::kStart, "<|start|>"},
    {harmony_tokens::kEnd, "<|end|>"},
    {harmony_tokens::kMessage, "<|message|>"},
    {harmony_tokens::kCall, "<|call|>"},
    {harmony_tokens::kEndOfPrompt, "<|endofprompt|>"},
}};
// o200k_harmony lays <|reserved_200013|>..<|reserved_201087|> over o200k_base's specials, so
// 200018 answers to both <|endofprompt|> and <|reserved_200018|> (tiktoken and gpt-tokenizer
// agree); it decodes to <|endofprompt|>.
constexpr TokenId kReservedRangeStart = 200013;

// OpenAI's o200k split (tiktoken / openai-harmony). Whitespace is spelled out as Unicode
// White_Space, which is what \s means to the Rust regex crate those use; PCRE2 10.42's \s
// also matches U+180E, no longer White_Space since Unicode 6.3. (?i:...) folds case as the Rust regex does, so 'ſ
// (U+017F) is a contraction too. Anchored: every valid code point starts some alternative, so
// each match begins where the previous one ended.
std::string split_pattern() {
  const std::string ws = R"(\t\n\x{0B}\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";
  const std::string contraction = R"((?i:'s|'t|'re|'ve|'m|'ll|'d)?)";
  return R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+)" + contraction +
         R"(|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*)" + contraction +
         R"(|\p{N}{1,3})"
         R"(| ?[^)" + ws + R"(\p{L}\p{N}]+[\r\n/]*)"
         "|[" + ws + "]*[\\r\\n]+"
         "|[" + ws + "]+(?![^" + ws + "])"
         "|[" + ws + "]+";
}

std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR, 256> buffer;
  pcre2_get_error_message(code, buffer.data(), buffer.size());
  return reinterpret_cast<const char*>(buffer.data());
}

// Length of the well-formed UTF-8 character at the start of `s` (RFC 3629: shortest form, no
// surrogates, at most U+10FFFF; PCRE2's rules too), or 0 where none starts.
size_t utf8_char_length(std::string_view s) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  if (byte(0) < 0x80) return 1;
  size_t length;
  unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte
  if (byte(0) >= 0xc2 && byte(0) <= 0xdf) {
    length = 2;
  } else if (byte(0) >= 0xe0 && byte(0) <= 0xef) {
    length = 3;
    if (byte(0) == 0xe0) lo = 0xa0;  // overlong
    if (byte(0) == 0xed) hi = 0x9f;  // surrogates
  } else if (byte(0) >= 0xf0 && byte(0) <= 0xf4) {
    length = 4;
    if (byte(0) == 0xf0) lo = 0x90;  // overlong
    if (byte(0) == 0xf4) hi = 0x8f;  // above U+10FFFF
  } else {
    return 0;
  }
  if (s.size() < length || byte(1) < lo || byte(1) > hi) return 0;
  for (size_t i = 2; i < length; ++i) {
    if ((byte(i) & 0xc0) != 0x80) return 0;
  }
  return length;
}

struct Pcre2CodeFree {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct Pcre2MatchDataFree {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};
using MatchData = std::unique_ptr<pcre2_match_data, Pcre2MatchDataFree>;

// Every special token's name and the reverse map, built once: they need no data file.
struct SpecialTable {
  std::vector<std::string> names;  // by id - kFirstSpecial
  std::map<std::string, TokenId, std::less<>> ids;
  size_t longest_name = 0;

  SpecialTable() {
    names.resize(kVocabSize - kFirstSpecial);
    for (auto [id, name] : kNamedSpecials) {
      names[id - kFirstSpecial] = name;
      ids.emplace(name, id);
    }
    for (TokenId id = kFirstReserved; id < kVocabSize; ++id) {
      std::string& name = names[id - kFirstSpecial];
      if (id < kReservedRangeStart && !name.empty()) continue;
      std::string reserved = fmt::format("<|reserved_{}|>", id);
      if (name.empty()) name = reserved;
      ids.emplace(std::move(reserved), id);
    }
    for (const auto& [name, id] : ids) longest_name = std::max(longest_name, name.size());
  }
};

const SpecialTable& special_table() {
  static const SpecialTable table;
  return table;
}

}  // namespace

std::string special_token_name(TokenId id) {
  OSSRL_CHECK(id >= kFirstSpecial && id < kVocabSize, "token {} is not a special token", id);
  return special_table().names[size_t(id - kFirstSpecial)];
}

std::optional<TokenId> special_token_id(std::string_view name) {
  const auto& ids = special_table().ids;
  auto it = ids.find(name);
  if (it == ids.end()) return std::nullopt;
  return it->second;
}

struct Tokenizer::Impl {
  BytePairEncoder bpe;
  std::unique_ptr<pcre2_code, Pcre2CodeFree> split;
  const SpecialTable& specials = special_table();

  explicit Impl(BytePairEncoder ranks) : bpe(std::move(ranks)) {
    OSSRL_CHECK(bpe.size() == kFirstSpecial, "tokenizer ranks: {} tokens, but o200k_base has {}", bpe.size(),
                kFirstSpecial);
    const std::string pattern = split_pattern();
    int error;
    PCRE2_SIZE error_offset;
    split.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                              PCRE2_UTF | PCRE2_UCP | PCRE2_ANCHORED, &error, &error_offset, nullptr));
    OSSRL_CHECK(split, "o200k split regex: {} at offset {}", pcre2_message(error), error_offset);
    // Without JIT support pcre2_match interprets the pattern: slower, same pieces.
    pcre2_jit_compile(split.get(), PCRE2_JIT_COMPLETE);

  }

  struct SpecialMatch {
    size_t at, length;
    TokenId id;
  };
  // The first special-token name in `text` at or after `from`.
  std::optional<SpecialMatch> find_special(std::string_view text, size_t from) const {
    for (size_t at = text.find("<|", from); at != std::string_view::npos; at = text.find("<|", at + 1)) {
      // A name is "<|", then no '|', then "|>": the only candidate at `at` ends at the first
      // "|>", which a name fits within specials.longest_name bytes of `at`.
      size_t close = text.substr(at + 2, specials.longest_name - 2).find("|>");
      if (close == std::string_view::npos) continue;
      auto it = specials.ids.find(text.substr(at, close + 4));
      if (it != specials.ids.end()) return SpecialMatch{at, close + 4, it->second};
    }
    return std::nullopt;
  }

  // Encodes text without special tokens. Well-formed UTF-8 is split by the regex; each maximal
  // run of bytes that starts no well-formed character becomes one piece of its own, so any byte
  // string encodes, and decodes back to itself. (OpenAI's tokenizers take only valid Unicode.)
  void encode_ordinary(std::string_view text, MatchData& match, std::vector<TokenId>& out) const {
    size_t begin = 0;
    while (begin < text.size()) {
      size_t valid_end = begin;
      while (valid_end < text.size()) {
        size_t length = utf8_char_length(text.substr(valid_end));
        if (length == 0) break;
        valid_end += length;
      }
      encode_valid(text.substr(begin, valid_end - begin), match, out);
      size_t invalid_end = valid_end;
      while (invalid_end < text.size() && utf8_char_length(text.substr(invalid_end)) == 0) ++invalid_end;
      if (invalid_end > valid_end) bpe.encode_piece(text.substr(valid_end, invalid_end - valid_end), out);
      begin = invalid_end;
    }
  }

  void encode_valid(std::string_view text, MatchData& match, std::vector<TokenId>& out) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    for (size_t offset = 0; offset < text.size();) {
      int rc = pcre2_match(split.get(), subject, text.size(), offset, PCRE2_NO_UTF_CHECK, match.get(), nullptr);
      OSSRL_CHECK(rc > 0, "tokenizer: splitting text failed at byte {}: {}", offset, pcre2_message(rc));
      size_t end = pcre2_get_ovector_pointer(match.get())[1];
      bpe.encode_piece(text.substr(offset, end - offset), out);
      offset = end;
    }
  }
};

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

std::string Tokenizer::default_path() {
  // OSSRL_TOKENIZER lets a binary built on one machine find the data on another (the GPU
  // machine runs binaries built here, from a different directory).
  if (const char* path = std::getenv("OSSRL_TOKENIZER"); path && *path) return path;
  return std::string(OSSRL_DATA_DIR) + "/o200k_base.tiktoken";
}

std::shared_ptr<const Tokenizer> Tokenizer::load(const std::string& path) {
  std::shared_ptr<Tokenizer> tokenizer(new Tokenizer());
  tokenizer->impl_ = std::make_unique<Impl>(BytePairEncoder::load_tiktoken(path));
  return tokenizer;
}

std::vector<TokenId> Tokenizer::encode(std::string_view text, SpecialTokens special) const {
  MatchData match(pcre2_match_data_create_from_pattern(impl_->split.get(), nullptr));
  OSSRL_CHECK(match, "tokenizer: out of memory");
  std::vector<TokenId> tokens;
  tokens.reserve(text.size() / 4 + 1);
  size_t begin = 0;
  if (special == SpecialTokens::All) {
    while (auto special_match = impl_->find_special(text, begin)) {
      impl_->encode_ordinary(text.substr(begin, special_match->at - begin), match, tokens);
      tokens.push_back(special_match->id);
      begin = special_match->at + special_match->length;
    }
  }
  impl_->encode_ordinary(text.substr(begin), match, tokens);
  return tokens;
}

std::string Tokenizer::decode(std::span<const TokenId> tokens) const {
  std::string text;
  for (TokenId token : tokens) text += token_bytes(token);
  return text;
}

const std::string& Tokenizer::token_bytes(TokenId token) const {
  OSSRL_CHECK(token >= 0 && token < kVocabSize, "token {} is outside the o200k_harmony vocabulary [0, {})", token,
              kVocabSize);
  return token < kFirstSpecial ? impl_->bpe.bytes(token) : impl_->specials.names[size_t(token - kFirstSpecial)];
}

TokenId Tokenizer::special(std::string_view name) const {
  auto it = impl_->specials.ids.find(name);
  OSSRL_CHECK(it != impl_->specials.ids.end(), "\"{}\" is not an o200k_harmony special token", name);
  return it->second;
}

bool Tokenizer::is_special(TokenId token) const { return token >= kFirstSpecial && token < kVocabSize; }

int Tokenizer::vocab_size() const { return kVocabSize; }

}  // namespace ossrl
