// Small random gpt-oss checkpoints for the model and engine tests, written once per build
// into the generated folder.
#pragma once

#include <string>

#include <unistd.h>

#include "model/config.h"
#include "model/random_checkpoint.h"

namespace ossrl::testing {

// Three layers (sliding, full, sliding) with a window of 4 positions, so sequences of a
// dozen tokens cross it; GQA groups of two; four experts, two per token.
inline GptOssConfig tiny_config() {
  GptOssConfig c;
  c.num_hidden_layers = 3;
  c.hidden_size = 64;
  c.intermediate_size = 64;
  c.num_local_experts = 4;
  c.experts_per_token = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.sliding_window = 4;
  c.vocab_size = 97;
  c.layer_types = {AttentionType::Sliding, AttentionType::Full, AttentionType::Sliding};
  return c;
}

// Writes a random checkpoint of tiny_config() under the generated folder. The folder name
// carries the process id: ctest runs each test in its own process, several at once.
inline std::string tiny_checkpoint(const std::string& name, RandomCheckpointOptions options = {}) {
  const std::string dir =
      std::string(OSSRL_GENERATED_DIR) + "/tiny_models/" + name + "." + std::to_string(getpid());
  write_random_checkpoint(dir, tiny_config(), options);
  return dir;
}

}  // namespace ossrl::testing
