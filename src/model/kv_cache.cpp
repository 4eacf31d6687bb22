#include "model/kv_cache.h"

#include <algorithm>

namespace ossrl {

KvCache::KvCache(const GptOssConfig& config)
    : row_floats_(int64_t(config.num_key_value_heads) * config.head_dim) {
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    Layer layer;
    if (config.layer_types[size_t(l)] == AttentionType::Sliding) layer.sliding_window = config.sliding_window;
    layers_.push_back(std::move(layer));
  }
}

void KvCache::append(int l, const float* k, const float* v, int64_t n) {
  Layer& layer = layers_[size_t(l)];
  layer.k.insert(layer.k.end(), k, k + n * row_floats_);
  layer.v.insert(layer.v.end(), v, v + n * row_floats_);
}

void KvCache::commit(int64_t n) {
  length_ += n;
  for (Layer& layer : layers_) {
    if (layer.sliding_window == 0) continue;
    const int64_t keep_from = std::max<int64_t>(0, length_ - (layer.sliding_window - 1));
    const int64_t drop = keep_from - layer.first_position;
    if (drop <= 0) continue;
    layer.k.erase(layer.k.begin(), layer.k.begin() + drop * row_floats_);
    layer.v.erase(layer.v.begin(), layer.v.begin() + drop * row_floats_);
    layer.first_position = keep_from;
  }
}

}  // namespace ossrl
