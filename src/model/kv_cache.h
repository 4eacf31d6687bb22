// The keys and values one sequence has produced so far, per layer, so generation can feed
// one new token per step instead of the whole prefix.
#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace ossrl {

class KvCache {
 public:
  // Keys and values of one layer after RoPE, fp32 [positions, kv_heads, head_dim], for the
  // positions [first_position, first_position + rows).
  struct Layer {
    std::vector<float> k, v;
    int64_t first_position = 0;
    int sliding_window = 0;  // 0: a full-attention layer keeps every position
  };

  explicit KvCache(const GptOssConfig& config);

  // Positions already in the cache: the next token's position.
  int64_t length() const { return length_; }
  Layer& layer(int l) { return layers_[size_t(l)]; }
  const Layer& layer(int l) const { return layers_[size_t(l)]; }

  // Appends n new positions' keys and values [n, kv_heads, head_dim] to layer l. Every layer
  // receives the same n before commit(n).
  void append(int l, const float* k, const float* v, int64_t n);
  // The n appended positions now belong to the sequence. Sliding layers drop the keys no
  // later query can see (the next query at position p sees p - window + 1 .. p), so their
  // memory stays at window - 1 positions between steps however long the sequence grows.
  void commit(int64_t n);

 private:
  int64_t row_floats_;  // kv_heads * head_dim
  int64_t length_ = 0;
  std::vector<Layer> layers_;
};

}  // namespace ossrl
