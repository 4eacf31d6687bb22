// Tokenizer load time and single-thread encode/decode throughput; not a test, a number.
//   tokenizer_bench            the golden texts (all scripts, code, emoji, long runs)
//   tokenizer_bench FILE...    those files, each encoded as one text
#include <fmt/format.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "tokenizer/golden.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace ossrl;
  using clock = std::chrono::steady_clock;

  std::shared_ptr<const Tokenizer> tokenizer;
  for (int i = 0; i < 5; ++i) {
    auto start = clock::now();
    tokenizer = Tokenizer::load();
    fmt::print("load {}: {:.1f} ms\n", Tokenizer::default_path(), 1e3 * seconds_since(start));
  }

  std::vector<std::string> texts;
  if (argc > 1) {
    for (int i = 1; i < argc; ++i) {
      std::ifstream in(argv[i], std::ios::binary);
      std::stringstream contents;
      contents << in.rdbuf();
      texts.push_back(contents.str());
    }
  } else {
    for (auto& c : testing::read_golden()) texts.push_back(std::move(c.text));
  }
  size_t bytes = 0;
  for (const auto& text : texts) bytes += text.size();

  // Repeat until a second has passed, so small inputs are measured over many rounds.
  size_t tokens = 0, rounds = 0;
  auto start = clock::now();
  std::vector<std::vector<TokenId>> encoded(texts.size());
  do {
    tokens = 0;
    for (size_t i = 0; i < texts.size(); ++i) tokens += (encoded[i] = tokenizer->encode(texts[i])).size();
    ++rounds;
  } while (seconds_since(start) < 1.0);
  double encode_s = seconds_since(start) / rounds;

  rounds = 0;
  size_t decoded = 0;
  start = clock::now();
  do {
    for (const auto& ids : encoded) decoded += tokenizer->decode(ids).size();
    ++rounds;
  } while (seconds_since(start) < 1.0);
  double decode_s = seconds_since(start) / rounds;

  fmt::print("{} texts, {:.2f} MB, {} tokens ({:.2f} bytes/token)\n", texts.size(), bytes / 1e6, tokens,
             double(bytes) / tokens);
  fmt::print("encode: {:.1f} MB/s, {:.2f} M tokens/s (one thread)\n", bytes / encode_s / 1e6, tokens / encode_s / 1e6);
  fmt::print("decode: {:.1f} MB/s (one thread)\n", decoded / rounds / decode_s / 1e6);
}
