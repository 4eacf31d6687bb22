// gpt-oss on the GPU: the weights in device memory as the kernels read them, a paged KV
// cache, the activation workspace, and one forward step over a ragged batch of tokens.
// The scheduler (engine/cuda_engine.h) decides which tokens go into a step; this class only
// runs it. Every buffer has a fixed address for the model's lifetime, so a step can be
// captured once in a CUDA graph and replayed with new contents in its input arrays.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include <cuda_runtime.h>

#include "cuda/attention.h"
#include "cuda/lora.h"
#include "engine/cuda_weights.h"
#include "engine/op_profiler.h"
#include "engine/sampling.h"
#include "model/config.h"

namespace ossrl {

// The largest step the workspace is sized for.
struct StepCapacity {
  int max_tokens = 0;          // tokens in one forward (prefill chunk + decode tokens)
  int max_sequences = 0;       // sequences in one forward = rows of logits / samples
  int max_tiles = 0;           // attention query tiles (cuda/attention.h)
  int max_pages_per_seq = 0;   // block table width: max sequence length / page_size, rounded up
};

// Device arrays of one step, filled by the scheduler before forward(). [n] below is the
// step's n_tokens, [s] its n_sequences.
struct StepBuffers {
  int32_t* tokens = nullptr;        // [n]
  int32_t* positions = nullptr;     // [n]
  int32_t* kv_slots = nullptr;      // [n] page * page_size + offset; -1: padding token
  cuda::QueryTile* tiles = nullptr; // [n_tiles]
  int32_t* block_tables = nullptr;  // [max_sequences, max_pages_per_seq]
  int32_t* logit_rows = nullptr;    // [s] the token whose next-token logits row s holds
  SamplingParams* params = nullptr; // [s]
  uint64_t* rng_keys = nullptr;     // [s] SamplingRng::key() of each sequence
  uint64_t* rng_draws = nullptr;    // [s] which draw of that stream this step uses
  // Outputs.
  float* logits = nullptr;          // [s, vocab] fp32
  int32_t* sampled = nullptr;       // [s]
  float* logprobs = nullptr;        // [s] log p(sampled) at temperature 1
};

// Bytes the model holds on the GPU, by purpose (the memory plan printed at start), and the
// weights it reads from pinned host memory instead.
struct MemoryPlan {
  size_t weights = 0;
  size_t kv_cache = 0;
  size_t workspace = 0;
  int kv_pages = 0;
  int page_size = 0;
  size_t host_embeddings = 0;  // embed_tokens offloaded (ModelOptions), not in `weights`
};

// Where CudaModel keeps its weights.
struct ModelOptions {
  // embed_tokens in pinned host memory mapped into the GPU's address space: the embedding
  // kernel reads a step's rows over PCIe (n_tokens x hidden x 2 bytes, a few µs; no copy,
  // graph capturable), and the table (gpt-oss: 201088 x 2880 bf16, 1.08 GiB) leaves the GPU.
  // lm_head, which reads every row each step, stays: needs tie_word_embeddings false, as
  // gpt-oss has.
  bool offload_embeddings = false;
};

class CudaModel {
 public:
  // Uploads a Hugging Face checkpoint folder: attention, router, embedding, lm_head in bf16
  // (fp32 checkpoints are rounded), experts as stored (MXFP4 codes and scales as they are;
  // dense bf16 experts transposed to [experts, out, in]); norms, biases, sinks in fp32.
  static std::unique_ptr<CudaModel> load(const std::string& dir, const ModelOptions& options = {});
  // A model of `config`'s shape with random weights written on the GPU, so the 20b and 120b
  // shapes can be benchmarked with no checkpoint and no host copy. Activations stay O(1).
  static std::unique_ptr<CudaModel> random(const GptOssConfig& config, bool mxfp4_experts, uint64_t seed,
                                           const ModelOptions& options = {});
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const GptOssConfig& config() const;
  // The weights, for the trainer (train/cuda_policy.h), which shares this one copy.
  const DeviceWeights& weights() const;

  // Allocates the KV cache (kv_pages pages of page_size positions, every layer) and the
  // workspace and step buffers for steps up to `capacity`; replaces any earlier allocation.
  // Throws an Error with the bytes needed when it does not fit.
  void allocate(const StepCapacity& capacity, int kv_pages, int page_size);
  // Frees the KV cache, workspace and step buffers (allocate() again before a forward): what
  // an engine does when it goes, so training can use the memory between rollouts.
  void release();
  const StepCapacity& capacity() const;
  MemoryPlan memory_plan() const;
  StepBuffers& step();

  // Enqueues one forward pass on `stream`: embedding, every layer (writing the new tokens' k
  // and v into their kv_slots), final norm and lm_head for the n_sequences logit_rows, then,
  // when `sample`, sampling into step().sampled / logprobs. Reads only step()'s arrays and
  // these counts, so the same call can be captured in a graph.
  void forward(int n_tokens, int n_tiles, int n_sequences, bool sample, cudaStream_t stream);

  // The policy's LoRA adapters (and trained sinks) for every forward from now on, so rollouts
  // sample from base + LoRA: one entry per layer, device views (cuda/lora.h) into memory the
  // caller owns and keeps alive; empty: the base model alone. The addresses are captured by
  // CUDA graphs, so new values (an optimizer step) need no call; set adapters before an
  // engine captures its graphs.
  void set_adapters(std::span<const cuda::DeviceLayerAdapters> layers);

  // Times the ops of the eager forward steps `profiler` selects (engine/op_profiler.h);
  // null (the default) records nothing. The profiler must outlive its use here.
  void set_profiler(OpProfiler* profiler);

 private:
  struct Impl;
  explicit CudaModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ossrl
