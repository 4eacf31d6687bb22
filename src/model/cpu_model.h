// The CPU reference forward pass of gpt-oss: plain loops in fp32 over weights read straight
// from the checkpoint's memory map. It is the oracle the CUDA engine is checked against,
// and it is small enough to run the tiny test models and, slowly, the real ones. Opened with
// Activations::Bf16 it rounds activations where the CUDA engine keeps them in bf16
// (model/cpu/activations.h): the GPU's numbers up to summation order, for tests that need
// its tokens exactly (greedy generation).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "model/config.h"
#include "model/cpu/activations.h"
#include "model/cpu/decoder.h"
#include "model/kv_cache.h"
#include "model/rope.h"
#include "model/weights.h"

namespace ossrl {

// Which rows forward() returns logits for.
enum class LogitsFor { AllTokens, LastTokens };

class CpuModel {
 public:
  // Opens a checkpoint folder: config.json and model.safetensors (or its index and shards),
  // and views every weight with its shape and dtype checked; throws an Error naming the file
  // and tensor on any problem.
  explicit CpuModel(const std::string& dir, Activations activations = Activations::Fp32);
  CpuModel(const CpuModel&) = delete;
  CpuModel& operator=(const CpuModel&) = delete;

  const GptOssConfig& config() const { return config_; }
  // The checkpoint's weight views and RoPE table, for code that runs the same decoder
  // layers (train::Policy); valid while the model lives.
  const GptOssWeights& weights() const { return weights_; }
  const RopeFrequencies& rope() const { return rope_; }
  ModelRef ref() const { return ModelRef{config_, weights_, rope_, activations_}; }
  Activations activations() const { return activations_; }
  // An empty cache for one sequence.
  KvCache new_cache() const { return KvCache(config_); }

  // A ragged batch: sequence b's new tokens are tokens[offsets[b] .. offsets[b+1]) (no
  // padding; every sequence has at least one), placed after what caches[b] already holds
  // (positions caches[b]->length() onward), and appended to caches[b]. A prefill is a call
  // with the whole prompt on an empty cache; a decode step a call with one token each.
  // Returns fp32 logits [tokens, vocab] (AllTokens) or [sequences, vocab] for each
  // sequence's last token (LastTokens: the vocabulary is 201088 wide on the real models).
  // adapters: one per layer (train/lora.h's Lora::layer), or empty for the checkpoint alone;
  // the trainer samples its rollouts from base + LoRA this way.
  std::vector<float> forward(std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                             std::span<KvCache* const> caches, LogitsFor which,
                             std::span<const LayerAdapters* const> adapters = {});

  // log p(tokens[t] | the sequence's tokens before t) for every token of a ragged batch of
  // whole sequences (0 at each sequence's first token), [tokens]. Logits are formed a few
  // rows by a vocabulary chunk at a time (model/cpu/lm_head.h), never as a [tokens, vocab]
  // block.
  std::vector<float> log_probs(std::span<const int32_t> tokens, std::span<const int32_t> offsets);

 private:
  GptOssConfig config_;
  Checkpoint checkpoint_;
  GptOssWeights weights_;
  RopeFrequencies rope_;
  Activations activations_;
};

}  // namespace ossrl
