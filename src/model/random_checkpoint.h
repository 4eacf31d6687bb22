// Random gpt-oss checkpoints of any shape, for tests, the CLI demo and benchmarks: the
// same folder layout, names, dtypes and expert encodings as the published checkpoints.
#pragma once

#include <cstdint>
#include <string>

#include "core/dtype.h"
#include "model/config.h"

namespace ossrl {

struct RandomCheckpointOptions {
  uint64_t seed = 0;
  // MXFP4 experts (`*_blocks`, `*_scales`, as released) or dense ones (`gate_up_proj`
  // [E, hidden, 2*intermediate], `down_proj` [E, intermediate, hidden], as transformers
  // saves them after dequantising).
  bool mxfp4_experts = true;
  // Dtype of every other tensor (and of dense experts): F32 or BF16.
  DType dtype = DType::BF16;
};

// Writes `dir`/config.json and `dir`/model.safetensors (creating `dir`), deterministic in
// options.seed. Weights are scaled by 1/sqrt(fan_in) so every activation stays O(1) and the
// logits are O(1): the routing, clamps and softmaxes all see realistic ranges. MXFP4 needs
// hidden and intermediate sizes that are multiples of 32.
void write_random_checkpoint(const std::string& dir, const GptOssConfig& config,
                             const RandomCheckpointOptions& options);

}  // namespace ossrl
