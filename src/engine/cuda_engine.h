// The rollout engine on the GPU: a scheduler over CudaModel (engine/cuda_model.h) with the
// same contract as the CPU generate() (engine/generate.h), fast enough for GRPO's many
// completions per prompt.
//
// - Continuous batching: up to max_batch sequences run at once; a finished sequence's slot
//   goes to the next prompt in the queue at the very next step.
// - Ragged steps: each step is one forward over every running sequence's new tokens (one
//   per decoding sequence, a prompt chunk per prefilling one), no padding; prompt tokens
//   per step are capped at prefill_chunk so decoding never stalls behind a long prompt.
// - Paged KV cache (engine/kv_pages.h), sized from the options.
// - Prefix sharing: identical prompts (the G completions of one GRPO prompt) are prefilled
//   once by the first of them; the others share its whole pages before the one holding the
//   prompt's last token and prefill only the 1 to page_size tokens from there on, so no page
//   is ever written by two sequences and nothing is copied.
// - CUDA graphs: a step of decode tokens only replays a graph captured once per batch-size
//   bucket (1, 2, 4, ..., max_batch), the batch padded to the bucket; steps holding prompt
//   tokens run eagerly.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/cuda_model.h"
#include "engine/generate.h"

namespace ossrl {

struct EngineOptions {
  int max_batch = 256;      // sequences running at once; also the logit rows of one step
  int prefill_chunk = 8192; // prompt tokens per step
  int page_size = 16;       // positions per KV page
  // KV cache size: kv_pages pages when > 0, else kv_cache_gb GiB when > 0, else 90% of the
  // GPU memory left free once the weights and workspace are allocated.
  int kv_pages = 0;
  double kv_cache_gb = 0.0;
  // Positions one sequence may hold (prompt + new tokens); sizes the block tables.
  int max_sequence_length = 32768;
  bool cuda_graphs = true;
  bool prefix_sharing = true;
};

struct EngineStats {
  int64_t steps = 0;
  int64_t prefill_steps = 0;   // steps holding prompt tokens (scoring steps included)
  int64_t decode_steps = 0;    // steps of decode tokens only
  int64_t graph_replays = 0;   // decode steps replayed from a CUDA graph
  int64_t prompt_tokens = 0;   // prompt tokens run through the model (a shared prefix once)
  int64_t sampled_tokens = 0;  // tokens generated
  int64_t scored_tokens = 0;   // tokens whose log-prob log_probs() computed
  double prefill_seconds = 0;  // wall time of the prefill steps
  double decode_seconds = 0;   // wall time of the decode steps
  size_t peak_gpu_bytes = 0;   // device memory in use (all processes), highest seen after a step
};

class CudaEngine {
 public:
  // Allocates the model's KV cache and workspace for these options (CudaModel::allocate),
  // replacing what an earlier engine on the same model allocated: one engine per model at a time.
  CudaEngine(CudaModel& model, const EngineOptions& options);
  // Frees the model's KV cache and workspace (CudaModel::release).
  ~CudaEngine();
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;

  // As generate() in engine/generate.h, without LoRA adapters: one Generation per prompt,
  // prompt i sampling from SamplingRng(options.seed, i), so the same seed gives the same
  // completions whatever max_batch, and greedy decoding follows the CPU model's argmax.
  std::vector<Generation> generate(const std::vector<std::vector<int32_t>>& prompts, const GenerateOptions& options);

  // As CpuModel::log_probs: log p(tokens[t] | the sequence's tokens before t) for a ragged
  // batch of whole sequences, 0 at each sequence's first token. Up to max_batch tokens get
  // their logits per step.
  std::vector<float> log_probs(std::span<const int32_t> tokens, std::span<const int32_t> offsets);

  MemoryPlan memory_plan() const;
  const EngineStats& stats() const;
  void reset_stats();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// "weights 12.85 GiB, KV cache 4096 pages x 16 positions = 3.00 GiB, workspace 1.20 GiB,
// total 17.05 GiB": the memory plan printed when an engine starts.
std::string describe(const MemoryPlan& plan);

}  // namespace ossrl
