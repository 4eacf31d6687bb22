#include "tokenizer/bpe.h"

#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "core/error.h"
#include "tokenizer/golden.h"

namespace ossrl {
namespace {

using Ids = std::vector<TokenId>;

// The 256 single bytes (rank = byte value) and then `merges`, ranked in order.
BytePairEncoder tiny_vocabulary(std::vector<std::string> merges) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.emplace_back(1, static_cast<char>(b));
  tokens.insert(tokens.end(), merges.begin(), merges.end());
  return BytePairEncoder(std::move(tokens));
}

Ids scan(const BytePairEncoder& bpe, std::string_view piece) {
  Ids out;
  bpe.merge_by_scan(piece, out);
  return out;
}
Ids heap(const BytePairEncoder& bpe, std::string_view piece) {
  Ids out;
  bpe.merge_by_heap(piece, out);
  return out;
}

TEST(BytePairEncoder, MergesLowestRankFirstLeftmostOnTies) {
  // ab=256, bc=257, abc=258, aa=259
  const BytePairEncoder bpe = tiny_vocabulary({"ab", "bc", "abc", "aa"});
  for (auto merge : {scan, heap}) {
    EXPECT_EQ(merge(bpe, "abc"), Ids{258});                // ab first, then ab+c
    EXPECT_EQ(merge(bpe, "bca"), (Ids{257, 'a'}));
    EXPECT_EQ(merge(bpe, "aaa"), (Ids{259, 'a'}));         // tie: the leftmost pair
    EXPECT_EQ(merge(bpe, "aaaa"), (Ids{259, 259}));
    EXPECT_EQ(merge(bpe, "xyz"), (Ids{'x', 'y', 'z'}));
    EXPECT_EQ(merge(bpe, "q"), Ids{'q'});
    EXPECT_EQ(merge(bpe, ""), Ids{});
  }
  EXPECT_EQ(bpe.rank("abc"), 258);
  EXPECT_EQ(bpe.rank("abcd"), BytePairEncoder::kNoRank);
}

// The two merge strategies agree on o200k_base for pieces cut from the golden texts and for
// random bytes, short and long.
TEST(BytePairEncoder, ScanAndHeapAgree) {
  const BytePairEncoder bpe = BytePairEncoder::load_tiktoken(Tokenizer::default_path());
  std::string corpus;
  for (const auto& c : testing::read_golden()) corpus += c.text;
  std::mt19937 rng(1);
  for (int i = 0; i < 20000; ++i) {
    std::string piece;
    size_t length = rng() % (i % 10 == 0 ? 600 : 40);
    if (i % 3 == 0) {
      piece.resize(length);
      for (char& c : piece) c = static_cast<char>(rng() % 8 == 0 ? rng() : 'a' + rng() % 3);
    } else {
      piece = corpus.substr(rng() % corpus.size(), length);
    }
    ASSERT_EQ(scan(bpe, piece), heap(bpe, piece)) << "piece of " << piece.size() << " bytes, case " << i;
  }
}

TEST(BytePairEncoder, RejectsMalformedRankFiles) {
  const std::string path = ::testing::TempDir() + "/ranks.tiktoken";
  auto load = [&](const std::string& contents) {
    std::ofstream(path) << contents;
    return BytePairEncoder::load_tiktoken(path);
  };
  EXPECT_THROW(load("QQ== 0\nQg== 1\n"), Error);             // lacks most single bytes
  EXPECT_THROW(load("QQ== 0\nQg== 5\n"), Error);             // ranks out of order
  EXPECT_THROW(load("QQ==0\n"), Error);                      // no separator
  EXPECT_THROW(load("Q!== 0\n"), Error);                     // not base64
  EXPECT_THROW(load("QQ== 0\nQQ== 1\n"), Error);             // same bytes twice
  EXPECT_THROW(BytePairEncoder::load_tiktoken(path + ".missing"), Error);
}

}  // namespace
}  // namespace ossrl
