#include "tokenizer/bpe.h"

#include <array>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <functional>
#include <queue>
#include <span>
#include <utility>

#include "core/error.h"

namespace ossrl {
namespace {

// FNV-1a with a final multiply-xorshift, so that the low bits the table indexes by depend on
// every byte. Keys are a few bytes long; this is faster than a block hash at that size.
uint64_t hash_bytes(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) h = (h ^ c) * 0x100000001b3ull;
  h ^= h >> 32;
  h *= 0x9e3779b97f4a7c15ull;
  return h ^ (h >> 29);
}

// Standard base64 (RFC 4648, with padding), as tiktoken files use. False on a malformed string.
bool decode_base64(std::string_view text, std::string& out) {
  static constexpr std::array<int8_t, 256> kValue = [] {
    std::array<int8_t, 256> value{};
    value.fill(-1);
    constexpr std::string_view kAlphabet =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < kAlphabet.size(); ++i) value[static_cast<uint8_t>(kAlphabet[i])] = static_cast<int8_t>(i);
    return value;
  }();
  if (text.size() % 4 != 0) return false;
  size_t padding = 0;
  while (padding < 2 && padding < text.size() && text[text.size() - 1 - padding] == '=') ++padding;
  out.clear();
  uint32_t bits = 0;
  for (size_t i = 0; i < text.size() - padding; ++i) {
    int8_t value = kValue[static_cast<uint8_t>(text[i])];
    if (value < 0) return false;
    bits = bits << 6 | static_cast<uint32_t>(value);
    if (i % 4 == 3) {
      out.push_back(static_cast<char>(bits >> 16));
      out.push_back(static_cast<char>(bits >> 8));
      out.push_back(static_cast<char>(bits));
      bits = 0;
    }
  }
  if (padding == 1) {  // 3 characters left: 18 bits, 2 bytes
    out.push_back(static_cast<char>(bits >> 10));
    out.push_back(static_cast<char>(bits >> 2));
  } else if (padding == 2) {  // 2 characters left: 12 bits, 1 byte
    out.push_back(static_cast<char>(bits >> 4));
  }
  return true;
}

std::string read_file(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) {
    fail("cannot open tokenizer ranks {}: {}; run scripts/setup.sh, which writes them", path,
         std::strerror(errno));
  }
  std::string data;
  std::array<char, 1 << 16> buffer;
  size_t n;
  while ((n = std::fread(buffer.data(), 1, buffer.size(), file)) > 0) data.append(buffer.data(), n);
  bool failed = std::ferror(file) != 0;
  std::fclose(file);
  OSSRL_CHECK(!failed, "error reading tokenizer ranks {}", path);
  return data;
}

}  // namespace

BytePairEncoder::BytePairEncoder(std::vector<std::string> token_bytes) : bytes_(std::move(token_bytes)) {
  // At most 1/2 full keeps linear probes short: 2^19 slots (4 MiB) for o200k_base.
  slots_.assign(std::bit_ceil(2 * bytes_.size() + 1), Slot{0, -1});
  slot_mask_ = slots_.size() - 1;
  for (TokenId r = 0; r < size(); ++r) {
    OSSRL_CHECK(rank(bytes_[r]) == kNoRank, "tokenizer ranks {} and {} have the same bytes", rank(bytes_[r]), r);
    uint64_t hash = hash_bytes(bytes_[r]);
    uint64_t i = hash & slot_mask_;
    while (slots_[i].rank >= 0) i = (i + 1) & slot_mask_;
    slots_[i] = {static_cast<uint32_t>(hash >> 32), r};
  }
  // Byte-level BPE can encode any byte string only if every byte is a token.
  for (int byte = 0; byte < 256; ++byte) {
    byte_ranks_[byte] = rank(std::string(1, static_cast<char>(byte)));
    OSSRL_CHECK(byte_ranks_[byte] != kNoRank, "tokenizer ranks lack byte {:#04x}", byte);
  }
}

BytePairEncoder BytePairEncoder::load_tiktoken(const std::string& path) {
  const std::string data = read_file(path);
  std::vector<std::string> token_bytes;
  token_bytes.reserve(data.size() / 16);
  std::string bytes;
  for (size_t begin = 0, line = 1; begin < data.size(); ++line) {
    size_t end = data.find('\n', begin);
    if (end == std::string::npos) end = data.size();
    std::string_view text(data.data() + begin, end - begin);
    begin = end + 1;

    size_t space = text.find(' ');
    TokenId rank = -1;
    bool ok = space != std::string_view::npos && decode_base64(text.substr(0, space), bytes);
    if (ok) {
      auto [next, error] = std::from_chars(text.data() + space + 1, text.data() + text.size(), rank);
      ok = error == std::errc() && next == text.data() + text.size();
    }
    OSSRL_CHECK(ok, "{}:{}: expected \"<base64 bytes> <rank>\", got \"{}\"", path, line, text.substr(0, 80));
    OSSRL_CHECK(rank == static_cast<TokenId>(token_bytes.size()), "{}:{}: rank {} where rank {} was expected",
                path, line, rank, token_bytes.size());
    token_bytes.push_back(bytes);
  }
  return BytePairEncoder(std::move(token_bytes));
}

TokenId BytePairEncoder::rank(std::string_view bytes) const {
  const uint64_t hash = hash_bytes(bytes);
  const auto hash_high = static_cast<uint32_t>(hash >> 32);
  for (uint64_t i = hash & slot_mask_;; i = (i + 1) & slot_mask_) {
    const Slot& slot = slots_[i];
    if (slot.rank < 0) return kNoRank;
    if (slot.hash_high == hash_high && bytes_[slot.rank] == bytes) return slot.rank;
  }
}

void BytePairEncoder::encode_piece(std::string_view piece, std::vector<TokenId>& out) const {
  if (TokenId whole = rank(piece); whole != kNoRank) {
    out.push_back(whole);
  } else if (piece.size() <= kShortPiece) {
    merge_by_scan(piece, out);
  } else {
    merge_by_heap(piece, out);
  }
}

void BytePairEncoder::merge_by_scan(std::string_view piece, std::vector<TokenId>& out) const {
  // parts[i] starts at byte parts[i].start and is token parts[i].token; parts[i].pair is the
  // rank of parts i and i + 1 together. The last part is a sentinel at the end of the piece.
  struct Part {
    uint32_t start;
    TokenId token, pair;
  };
  std::array<Part, kShortPiece + 1> on_stack;
  std::vector<Part> on_heap;
  size_t count = piece.size() + 1;
  if (count > on_stack.size()) on_heap.resize(count);
  std::span<Part> parts = count > on_stack.size() ? std::span<Part>(on_heap) : std::span<Part>(on_stack);

  auto pair_rank = [&](size_t i) {
    return i + 2 < count ? rank(piece.substr(parts[i].start, parts[i + 2].start - parts[i].start)) : kNoRank;
  };
  for (size_t i = 0; i < piece.size(); ++i) {
    parts[i] = {static_cast<uint32_t>(i), byte_ranks_[static_cast<uint8_t>(piece[i])], kNoRank};
  }
  parts[count - 1] = {static_cast<uint32_t>(piece.size()), kNoRank, kNoRank};
  for (size_t i = 0; i + 2 < count; ++i) parts[i].pair = pair_rank(i);

  while (true) {
    size_t best = 0;
    for (size_t i = 1; i + 2 < count; ++i) {
      if (parts[i].pair < parts[best].pair) best = i;
    }
    if (parts[best].pair == kNoRank) break;
    std::copy(parts.begin() + best + 2, parts.begin() + count, parts.begin() + best + 1);
    --count;
    parts[best].token = parts[best].pair;
    parts[best].pair = pair_rank(best);
    if (best > 0) parts[best - 1].pair = pair_rank(best - 1);
  }
  for (size_t i = 0; i + 1 < count; ++i) out.push_back(parts[i].token);
}

void BytePairEncoder::merge_by_heap(std::string_view piece, std::vector<TokenId>& out) const {
  // Parts form a linked list over their start bytes; the part starting at p is token[p], and
  // pair[p] is the rank of it joined with the next one (kNoRank once p is merged away). The heap holds (rank, p)
  // for every pair rank ever computed; entries whose rank is no longer pair[p] are stale.
  // Popping the smallest (rank, start) is the scan's "lowest rank, leftmost" choice.
  const int32_t n = static_cast<int32_t>(piece.size());
  std::vector<int32_t> next(n), prev(n + 1);
  std::vector<TokenId> token(n), pair(n, kNoRank);
  using Entry = std::pair<TokenId, int32_t>;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> heap;

  auto update = [&](int32_t p) {
    int32_t q = next[p];
    pair[p] = q < n ? rank(piece.substr(p, next[q] - p)) : kNoRank;
    if (pair[p] != kNoRank) heap.emplace(pair[p], p);
  };
  for (int32_t p = 0; p < n; ++p) {
    next[p] = p + 1;
    prev[p] = p - 1;
    token[p] = byte_ranks_[static_cast<uint8_t>(piece[p])];
  }
  for (int32_t p = 0; p < n; ++p) update(p);

  while (!heap.empty()) {
    auto [r, p] = heap.top();
    heap.pop();
    if (pair[p] != r) continue;
    int32_t q = next[p];
    next[p] = next[q];
    prev[next[q]] = p;
    pair[q] = kNoRank;
    token[p] = r;
    update(p);
    if (prev[p] >= 0) update(prev[p]);
  }
  for (int32_t p = 0; p < n; p = next[p]) out.push_back(token[p]);
}

}  // namespace ossrl
