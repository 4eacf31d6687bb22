// Byte-level byte-pair encoding over a rank table (o200k_base: 199998 ranks): the bytes of
// each rank, lookup of a rank by its bytes, and the merge of one pre-tokenised piece.
// Internal to src/tokenizer; Tokenizer is the interface the rest of ossrl uses.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace ossrl {

class BytePairEncoder {
 public:
  static constexpr TokenId kNoRank = INT32_MAX;
  // Pieces up to this many bytes merge by rescanning all pairs after each merge (quadratic, no
  // allocation, fastest for the few-byte pieces of ordinary text); longer ones use a heap, so
  // a megabyte of one letter cannot stall a rollout worker.
  static constexpr size_t kShortPiece = 64;

  // token_bytes[rank] is the byte string of that rank; every single byte must have a rank.
  explicit BytePairEncoder(std::vector<std::string> token_bytes);
  // A tiktoken rank file: "base64(token bytes) rank" per line, ranks 0, 1, 2, ... in order.
  static BytePairEncoder load_tiktoken(const std::string& path);

  int size() const { return static_cast<int>(bytes_.size()); }
  const std::string& bytes(TokenId rank) const { return bytes_[rank]; }
  TokenId rank(std::string_view bytes) const;  // kNoRank when no token has these bytes

  // Appends the tokens of one piece: the piece's own rank if it has one, else the merge.
  void encode_piece(std::string_view piece, std::vector<TokenId>& out) const;

  // The merge: start from single bytes and repeatedly merge the adjacent pair whose bytes have
  // the lowest rank (the leftmost on ties) until no adjacent pair has a rank. Both strategies
  // give the same tokens (the test checks); public so that it can.
  void merge_by_scan(std::string_view piece, std::vector<TokenId>& out) const;
  void merge_by_heap(std::string_view piece, std::vector<TokenId>& out) const;

 private:
  std::vector<std::string> bytes_;
  std::array<TokenId, 256> byte_ranks_;  // the token of each single byte
  // Open addressing, linear probing. A slot holds a rank (-1: empty) and the high half of its
  // hash, so that probes past other keys rarely touch bytes_ (a cache miss each).
  struct Slot {
    uint32_t hash_high;
    int32_t rank;
  };
  std::vector<Slot> slots_;
  uint64_t slot_mask_ = 0;
};

}  // namespace ossrl
