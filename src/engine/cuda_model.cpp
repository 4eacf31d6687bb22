#include "engine/cuda_model.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "cuda/buffer.h"
#include "cuda/embedding.h"
#include "cuda/gemv.h"
#include "cuda/linear.h"
#include "cuda/lora.h"
#include "cuda/moe.h"
#include "cuda/random_init.h"
#include "cuda/rmsnorm.h"
#include "cuda/rope.h"
#include "cuda/router.h"
#include "cuda/sampling.h"
#include "io/checkpoint.h"
#include "io/mxfp4.h"
#include "model/checkpoint_check.h"
#include "model/rope.h"
#include "model/weights.h"

namespace ossrl {

namespace {

using bf16 = __nv_bfloat16;
using cuda::DeviceBuffer;

double gib(size_t bytes) { return double(bytes) / double(size_t(1) << 30); }

// The activations of one step and the step's input/output arrays, sized for a StepCapacity.
// T = max_tokens, S = max_sequences, k = experts_per_token, r = the largest LoRA rank set
// (0: no adapters).
struct Workspace {
  DeviceBuffer<float> residual;             // [T, hidden] the residual stream
  DeviceBuffer<bf16> normed;                // [T, hidden] rmsnorm output, the next matmul's input
  DeviceBuffer<float> qkv;                  // [T, (heads + 2*kv_heads) * head_dim]
  DeviceBuffer<float> q;                    // [T, heads, head_dim] after RoPE
  DeviceBuffer<bf16> attention;             // [T, heads * head_dim] o_proj's input
  DeviceBuffer<float> router_logits;        // [T, experts]
  DeviceBuffer<int32_t> expert_index;       // [T, k]
  DeviceBuffer<float> expert_weight;        // [T, k]
  DeviceBuffer<int32_t> expert_offsets;     // [experts + 1]
  DeviceBuffer<int32_t> sorted_assignments; // [T * k]
  DeviceBuffer<bf16> swiglu;                // [T * k, intermediate] in expert order
  DeviceBuffer<float> expert_out;           // [T * k, hidden] in assignment order
  DeviceBuffer<bf16> lora_u;                // [T * k, r] an adapter's x · Aᵀ (attention: [T, r])
  DeviceBuffer<bf16> final_normed;          // [S, hidden] the logit rows, normed
  // StepBuffers' arrays.
  DeviceBuffer<int32_t> tokens, positions, kv_slots;  // [T]
  DeviceBuffer<cuda::QueryTile> tiles;                // [max_tiles]
  DeviceBuffer<int32_t> block_tables;                 // [S, max_pages_per_seq]
  DeviceBuffer<int32_t> logit_rows;                   // [S]
  DeviceBuffer<SamplingParams> params;                // [S]
  DeviceBuffer<uint64_t> rng_keys, rng_draws;         // [S]
  DeviceBuffer<float> logits;                         // [S, vocab]
  DeviceBuffer<int32_t> sampled;                      // [S]
  DeviceBuffer<float> logprobs;                       // [S]

  Workspace() = default;
  Workspace(Allocator& a, const GptOssConfig& c, const StepCapacity& cap, int lora_rank) {
    const size_t t = size_t(cap.max_tokens), s = size_t(cap.max_sequences);
    const size_t hidden = size_t(c.hidden_size), k = size_t(c.experts_per_token);
    const size_t experts = size_t(c.num_local_experts);
    residual = a.take<float>(t * hidden, "residual stream");
    normed = a.take<bf16>(t * hidden, "normed activations");
    qkv = a.take<float>(t * DeviceLayer::qkv_rows(c), "qkv activations");
    q = a.take<float>(t * DeviceLayer::q_dim(c), "rotated queries");
    attention = a.take<bf16>(t * DeviceLayer::q_dim(c), "attention output");
    router_logits = a.take<float>(t * experts, "router logits");
    expert_index = a.take<int32_t>(t * k, "expert choices");
    expert_weight = a.take<float>(t * k, "expert weights");
    expert_offsets = a.take<int32_t>(experts + 1, "expert offsets");
    sorted_assignments = a.take<int32_t>(t * k, "sorted assignments");
    swiglu = a.take<bf16>(t * k * size_t(c.intermediate_size), "expert SwiGLU activations");
    expert_out = a.take<float>(t * k * hidden, "expert outputs");
    lora_u = a.take<bf16>(lora_u_count(cap, c, lora_rank), "LoRA activations");
    final_normed = a.take<bf16>(s * hidden, "final normed rows");
    tokens = a.take<int32_t>(t, "step tokens");
    positions = a.take<int32_t>(t, "step positions");
    kv_slots = a.take<int32_t>(t, "step KV slots");
    tiles = a.take<cuda::QueryTile>(size_t(cap.max_tiles), "step query tiles");
    block_tables = a.take<int32_t>(s * size_t(cap.max_pages_per_seq), "block tables");
    logit_rows = a.take<int32_t>(s, "logit rows");
    params = a.take<SamplingParams>(s, "sampling parameters");
    rng_keys = a.take<uint64_t>(s, "sampling keys");
    rng_draws = a.take<uint64_t>(s, "sampling draws");
    logits = a.take<float>(s * size_t(c.vocab_size), "logits");
    sampled = a.take<int32_t>(s, "sampled tokens");
    logprobs = a.take<float>(s, "sampled log-probs");
  }

  static size_t lora_u_count(const StepCapacity& cap, const GptOssConfig& c, int lora_rank) {
    return size_t(cap.max_tokens) * size_t(c.experts_per_token) * size_t(lora_rank);
  }
};

// Copies host bytes to a device address, or to pinned host memory mapped into the device's
// (offloaded embeddings: unified addressing tells them apart); synchronous, since the source
// may be a temporary or the checkpoint's memory map.
void copy_to_device(void* dst, const void* src, size_t bytes) {
  OSSRL_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
}

// embed_tokens [vocab, hidden] bf16 in pinned host memory, mapped: the device address that
// kernels read, freeing the host allocation with its last owner. Write-combined: the host only
// writes it (once), and the GPU's reads over PCIe need not snoop the CPU's caches.
std::shared_ptr<bf16> offloaded_embeddings(const GptOssConfig& c) {
  const size_t bytes = size_t(c.vocab_size) * size_t(c.hidden_size) * sizeof(bf16);
  void* host = nullptr;
  const cudaError_t status = cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocWriteCombined);
  if (status != cudaSuccess) (void)cudaGetLastError();  // not sticky: the caller may recover
  OSSRL_CHECK(status == cudaSuccess,
              "CUDA model: cannot pin {:.2f} GiB of host memory for the offloaded embeddings ({}); run without "
              "offloading them, or free host memory",
              gib(bytes), cudaGetErrorString(status));
  void* device = nullptr;
  OSSRL_CUDA_CHECK(cudaHostGetDevicePointer(&device, host, 0));
  return std::shared_ptr<bf16>(static_cast<bf16*>(device), [host](bf16*) { cudaFreeHost(host); });
}

void upload(DeviceBuffer<float>& dst, const std::vector<float>& host) {
  OSSRL_CHECK(dst.size() == host.size(), "CUDA model: uploading {} values into a buffer of {}", host.size(),
              dst.size());
  copy_to_device(dst.data(), host.data(), host.size() * sizeof(float));
}

// Writes the F32 or BF16 matrix `w` at `dst` as bf16 [out, in]: bf16 rows go as they are,
// fp32 is rounded to nearest even, transposed storage (dense experts) is turned into [out, in].
void upload_bf16(bf16* dst, const WeightMatrix& w) {
  const size_t count = size_t(w.out) * size_t(w.in);
  if (w.format == WeightFormat::BF16 && !w.transposed) {
    copy_to_device(dst, w.data, count * sizeof(bf16));
    return;
  }
  OSSRL_CHECK(w.format != WeightFormat::MXFP4, "CUDA model: an MXFP4 matrix where bf16 is expected");
  const int64_t stored_rows = w.transposed ? w.in : w.out;
  const int64_t cols = w.stored_cols();
  std::vector<uint16_t> staged(count);
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < stored_rows; ++r) {
    w.decode_stored(r, 0, cols, row.data());
    for (int64_t c = 0; c < cols; ++c) {
      // Stored element [r, c] is W[c, r] when transposed.
      const int64_t o = w.transposed ? c : r, i = w.transposed ? r : c;
      staged[size_t(o * w.in + i)] = f32_to_bf16(row[size_t(c)]);
    }
  }
  copy_to_device(dst, staged.data(), count * sizeof(bf16));
}

// One layer's experts of one projection, from load_gpt_oss_weights' per-expert views.
void upload_experts(DeviceExperts& dst, const std::vector<WeightMatrix>& views, const std::vector<float>& bias) {
  if (dst.mxfp4) {
    // The views are slices of one [experts, out, in/32, 16] tensor (and its scales), expert e
    // at e * out * in/32 blocks: the whole tensor starts at view 0.
    copy_to_device(dst.blocks.data(), views[0].data, dst.blocks.bytes());
    copy_to_device(dst.scales.data(), views[0].scales, dst.scales.bytes());
  } else {
    for (size_t e = 0; e < views.size(); ++e) upload_bf16(dst.dense.data() + e * size_t(dst.out) * size_t(dst.in), views[e]);
  }
  upload(dst.bias, bias);
}

std::vector<float> concat(const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& c) {
  std::vector<float> all = a;
  all.insert(all.end(), b.begin(), b.end());
  all.insert(all.end(), c.begin(), c.end());
  return all;
}

// What the kernels support, checked before anything is allocated.
void check_supported(const GptOssConfig& c) {
  OSSRL_CHECK(c.head_dim == 64, "CUDA model: head_dim must be 64 (the attention kernel's), config has {}",
              c.head_dim);
  OSSRL_CHECK(c.experts_per_token <= 8 && c.num_local_experts <= 256,
              "CUDA model: the router supports at most 8 experts per token of 256, config has {} of {}",
              c.experts_per_token, c.num_local_experts);
  OSSRL_CHECK(c.hidden_size % 32 == 0 && c.intermediate_size % 32 == 0,
              "CUDA model: the expert kernels need hidden_size and intermediate_size divisible by 32 "
              "(got {} and {})", c.hidden_size, c.intermediate_size);
  OSSRL_CHECK(c.layer_types.size() == size_t(c.num_hidden_layers),
              "CUDA model: {} layer_types for {} layers", c.layer_types.size(), c.num_hidden_layers);
}

}  // namespace

struct CudaModel::Impl {
  const GptOssConfig config;
  DeviceWeights weights;

  // allocate()'s KV cache, workspace and step arrays.
  StepCapacity capacity;
  int kv_pages = 0, page_size = 0;
  size_t kv_bytes = 0, workspace_bytes = 0;
  DeviceBuffer<bf16> kv_cache;  // [layers, 2 (k, v), kv_pages * page_size, kv_heads, head_dim]
  Workspace ws;
  StepBuffers step;
  // One cuBLAS handle per stream forward() has run on (a handle is bound to its stream).
  std::map<cudaStream_t, std::unique_ptr<cuda::Blas>> blas;
  OpProfiler* profiler = nullptr;
  // set_adapters()'s views, one per layer (empty: the base model alone), and the rank the
  // workspace's lora_u is sized for: the largest set so far.
  std::vector<cuda::DeviceLayerAdapters> adapters;
  int lora_rank = 0;

  // Allocates every weight buffer of config's shape, contents unset.
  Impl(const GptOssConfig& c, const std::vector<bool>& mxfp4_layers, const ModelOptions& options) : config(c) {
    OSSRL_CHECK(!options.offload_embeddings || !c.tie_word_embeddings,
                "CUDA model: embeddings tied to lm_head cannot be offloaded to the host (lm_head reads all {} rows "
                "every step)",
                c.vocab_size);
    DeviceWeights& w = weights;
    w.config = c;
    Allocator a;
    if (options.offload_embeddings) {
      w.host_embed_tokens = offloaded_embeddings(c);
    } else {
      w.embed_tokens = a.take<bf16>(size_t(c.vocab_size) * size_t(c.hidden_size), "embed_tokens");
    }
    w.layers.reserve(size_t(c.num_hidden_layers));
    for (int l = 0; l < c.num_hidden_layers; ++l) w.layers.emplace_back(a, c, l, mxfp4_layers[size_t(l)]);
    w.norm = a.take<float>(size_t(c.hidden_size), "final norm");
    if (!c.tie_word_embeddings) w.lm_head = a.take<bf16>(size_t(c.vocab_size) * size_t(c.hidden_size), "lm_head");
    const RopeFrequencies rope = rope_frequencies(c.rope, c.head_dim);
    w.inv_freq = a.take<float>(rope.inv_freq.size(), "rope frequencies");
    upload(w.inv_freq, rope.inv_freq);
    w.attention_scaling = rope.attention_scaling;
    w.bytes = a.bytes();
  }

  // The embedding table to fill: on the GPU, or the offloaded host copy.
  bf16* embedding_table() {
    return weights.host_embed_tokens ? weights.host_embed_tokens.get() : weights.embed_tokens.data();
  }

  bf16* layer_kv(int l, int which) {
    const size_t slots = size_t(kv_pages) * size_t(page_size);
    const size_t per = slots * size_t(config.num_key_value_heads) * size_t(config.head_dim);
    return kv_cache.data() + (size_t(l) * 2 + size_t(which)) * per;
  }

  cuda::Blas& blas_for(cudaStream_t stream) {
    auto it = blas.find(stream);
    if (it != blas.end()) return *it->second;
    // Creating a handle allocates its workspace, which a graph being captured cannot record.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    OSSRL_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    OSSRL_CHECK(capture == cudaStreamCaptureStatusNone,
                "CUDA model: run one forward on a stream before capturing it in a graph (its cuBLAS "
                "handle is created on first use)");
    return *blas.emplace(stream, std::make_unique<cuda::Blas>(stream)).first->second;
  }
};

CudaModel::CudaModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaModel::~CudaModel() = default;

std::unique_ptr<CudaModel> CudaModel::load(const std::string& dir, const ModelOptions& options) {
  const GptOssConfig config = GptOssConfig::from_file(dir + "/config.json");
  const Checkpoint checkpoint = Checkpoint::open(dir);
  validate_gpt_oss_checkpoint(checkpoint, config);
  const GptOssWeights w = load_gpt_oss_weights(checkpoint, config);
  std::vector<bool> mxfp4_layers;
  for (const LayerWeights& layer : w.layers) mxfp4_layers.push_back(layer.mlp.gate_up[0].format == WeightFormat::MXFP4);
  check_supported(config);

  auto impl = std::make_unique<Impl>(config, mxfp4_layers, options);
  upload_bf16(impl->embedding_table(), w.embed_tokens);
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& src = w.layers[l];
    DeviceLayer& dst = impl->weights.layers[l];
    upload(dst.input_layernorm, src.input_layernorm);
    upload(dst.post_attention_layernorm, src.post_attention_layernorm);
    const size_t hidden = size_t(config.hidden_size);
    upload_bf16(dst.qkv.data(), src.attn.q_proj);
    upload_bf16(dst.qkv.data() + size_t(src.attn.q_proj.out) * hidden, src.attn.k_proj);
    upload_bf16(dst.qkv.data() + size_t(src.attn.q_proj.out + src.attn.k_proj.out) * hidden, src.attn.v_proj);
    upload_bf16(dst.o_proj.data(), src.attn.o_proj);
    if (config.attention_bias) {
      upload(dst.qkv_bias, concat(src.attn.q_bias, src.attn.k_bias, src.attn.v_bias));
      upload(dst.o_bias, src.attn.o_bias);
    }
    upload(dst.sinks, src.attn.sinks);
    upload_bf16(dst.router.data(), src.mlp.router);
    upload(dst.router_bias, src.mlp.router_bias);
    upload_experts(dst.gate_up, src.mlp.gate_up, src.mlp.gate_up_bias);
    upload_experts(dst.down, src.mlp.down, src.mlp.down_bias);
  }
  upload(impl->weights.norm, w.norm);
  if (!config.tie_word_embeddings) upload_bf16(impl->weights.lm_head.data(), w.lm_head);
  return std::unique_ptr<CudaModel>(new CudaModel(std::move(impl)));
}

std::unique_ptr<CudaModel> CudaModel::random(const GptOssConfig& config, bool mxfp4_experts, uint64_t seed,
                                              const ModelOptions& options) {
  check_supported(config);
  auto impl = std::make_unique<Impl>(config, std::vector<bool>(size_t(config.num_hidden_layers), mxfp4_experts),
                                     options);
  // model/random_checkpoint.cpp's scales: matrices 1/sqrt(fan_in), embedding 1, biases 0.1,
  // sinks 1, norm weights 1 ± 0.1. Each tensor draws from its own seed.
  constexpr float kBias = 0.1f, kNorm = 0.1f;
  uint64_t tensor = 0;
  auto next_seed = [&] { return seed + 0x9e3779b97f4a7c15ull * ++tensor; };
  auto fan_in = [](int in) { return float(1.0 / std::sqrt(double(in))); };
  auto bf16_tensor = [&](DeviceBuffer<bf16>& b, float stddev) {
    cuda::random_uniform_bf16(b.data(), b.size(), 0.0f, stddev, next_seed(), nullptr);
  };
  auto f32_tensor = [&](DeviceBuffer<float>& b, float mean, float stddev) {
    cuda::random_uniform_f32(b.data(), b.size(), mean, stddev, next_seed(), nullptr);
  };
  auto experts = [&](DeviceExperts& e) {
    if (e.mxfp4) {
      cuda::random_mxfp4(e.blocks.data(), e.scales.data(), e.scales.size(), fan_in(e.in), next_seed(), nullptr);
    } else {
      bf16_tensor(e.dense, fan_in(e.in));
    }
    f32_tensor(e.bias, 0.0f, kBias);
  };
  const int q_dim = config.num_attention_heads * config.head_dim;
  // Offloaded, the table is written over PCIe by the same kernel: the same values.
  cuda::random_uniform_bf16(impl->embedding_table(), size_t(config.vocab_size) * size_t(config.hidden_size), 0.0f,
                            1.0f, next_seed(), nullptr);
  for (DeviceLayer& layer : impl->weights.layers) {
    f32_tensor(layer.input_layernorm, 1.0f, kNorm);
    f32_tensor(layer.post_attention_layernorm, 1.0f, kNorm);
    bf16_tensor(layer.qkv, fan_in(config.hidden_size));
    bf16_tensor(layer.o_proj, fan_in(q_dim));
    f32_tensor(layer.qkv_bias, 0.0f, kBias);
    f32_tensor(layer.o_bias, 0.0f, kBias);
    f32_tensor(layer.sinks, 0.0f, 1.0f);
    bf16_tensor(layer.router, fan_in(config.hidden_size));
    f32_tensor(layer.router_bias, 0.0f, kBias);
    experts(layer.gate_up);
    experts(layer.down);
  }
  f32_tensor(impl->weights.norm, 1.0f, kNorm);
  bf16_tensor(impl->weights.lm_head, fan_in(config.hidden_size));
  OSSRL_CUDA_CHECK(cudaDeviceSynchronize());
  return std::unique_ptr<CudaModel>(new CudaModel(std::move(impl)));
}

const GptOssConfig& CudaModel::config() const { return impl_->config; }
const DeviceWeights& CudaModel::weights() const { return impl_->weights; }
const StepCapacity& CudaModel::capacity() const { return impl_->capacity; }
StepBuffers& CudaModel::step() { return impl_->step; }
void CudaModel::set_profiler(OpProfiler* profiler) { impl_->profiler = profiler; }

MemoryPlan CudaModel::memory_plan() const {
  const DeviceWeights& w = impl_->weights;
  const size_t host_embeddings =
      w.host_embed_tokens ? size_t(w.config.vocab_size) * size_t(w.config.hidden_size) * sizeof(bf16) : 0;
  return MemoryPlan{w.bytes,          impl_->kv_bytes, impl_->workspace_bytes, impl_->kv_pages, impl_->page_size,
                    host_embeddings};
}

void CudaModel::release() {
  Impl& m = *impl_;
  m.kv_cache = {};
  m.ws = {};
  m.step = {};
  m.kv_bytes = m.workspace_bytes = 0;
  m.capacity = {};
  m.kv_pages = m.page_size = 0;
}

void CudaModel::allocate(const StepCapacity& capacity, int kv_pages, int page_size) {
  Impl& m = *impl_;
  const GptOssConfig& c = m.config;
  OSSRL_CHECK(capacity.max_tokens > 0 && capacity.max_sequences > 0 && capacity.max_tiles > 0 &&
                  capacity.max_pages_per_seq > 0 && kv_pages > 0 && page_size > 0,
              "CUDA model: step capacity (tokens {}, sequences {}, tiles {}, pages per sequence {}), kv_pages "
              "{} and page_size {} must all be positive", capacity.max_tokens, capacity.max_sequences,
              capacity.max_tiles, capacity.max_pages_per_seq, kv_pages, page_size);
  release();  // the old allocation's memory counts as free for the new one

  const size_t kv_elements = size_t(c.num_hidden_layers) * 2 * size_t(kv_pages) * size_t(page_size) *
                             size_t(c.num_key_value_heads) * size_t(c.head_dim);
  const size_t kv_bytes = kv_elements * sizeof(bf16);
  Allocator counter(/*count_only=*/true);
  [[maybe_unused]] const Workspace counted(counter, c, capacity, m.lora_rank);
  const size_t workspace_bytes = counter.bytes();
  size_t free_bytes = 0, total_bytes = 0;
  OSSRL_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const size_t needed = kv_bytes + workspace_bytes;
  OSSRL_CHECK(needed <= free_bytes,
              "CUDA model: the KV cache ({} pages of {} positions x {} layers: {:.2f} GiB) and workspace ({} "
              "tokens, {} sequences: {:.2f} GiB) need {} bytes ({:.2f} GiB), but only {:.2f} GiB of {:.2f} GiB is "
              "free after {:.2f} GiB of weights", kv_pages, page_size, c.num_hidden_layers, gib(kv_bytes),
              capacity.max_tokens, capacity.max_sequences, gib(workspace_bytes), needed, gib(needed),
              gib(free_bytes), gib(total_bytes), gib(m.weights.bytes));

  m.kv_cache = DeviceBuffer<bf16>(kv_elements, "KV cache");
  Allocator allocator;
  m.ws = Workspace(allocator, c, capacity, m.lora_rank);
  m.kv_bytes = kv_bytes;
  m.workspace_bytes = allocator.bytes();
  m.capacity = capacity;
  m.kv_pages = kv_pages;
  m.page_size = page_size;
  Workspace& ws = m.ws;
  m.step = StepBuffers{.tokens = ws.tokens.data(),
                       .positions = ws.positions.data(),
                       .kv_slots = ws.kv_slots.data(),
                       .tiles = ws.tiles.data(),
                       .block_tables = ws.block_tables.data(),
                       .logit_rows = ws.logit_rows.data(),
                       .params = ws.params.data(),
                       .rng_keys = ws.rng_keys.data(),
                       .rng_draws = ws.rng_draws.data(),
                       .logits = ws.logits.data(),
                       .sampled = ws.sampled.data(),
                       .logprobs = ws.logprobs.data()};
}

namespace {

// An adapter's shape against the projection it adapts (an inactive one always fits).
void check_adapter(const cuda::DeviceAdapter& ad, int layer, const char* name, int experts, int in, int out) {
  if (!ad.active()) return;
  OSSRL_CHECK(ad.experts == experts && ad.in == in && ad.out == out && ad.r > 0,
              "CUDA model: the {} adapter of layer {} is {} x [{}, r {}, {}], the projection needs {} x [in {}, out "
              "{}] and r > 0",
              name, layer, ad.experts, ad.in, ad.r, ad.out, experts, in, out);
  OSSRL_CHECK(ad.a16 != nullptr && ad.b16 != nullptr,
              "CUDA model: the {} adapter of layer {} has no bf16 copies of A and B", name, layer);
}

}  // namespace

void CudaModel::set_adapters(std::span<const cuda::DeviceLayerAdapters> layers) {
  Impl& m = *impl_;
  const GptOssConfig& c = m.config;
  OSSRL_CHECK(layers.empty() || layers.size() == size_t(c.num_hidden_layers),
              "CUDA model: adapters for {} layers, the model has {}", layers.size(), c.num_hidden_layers);
  const int hidden = c.hidden_size, experts = c.num_local_experts;
  const int q_dim = c.num_attention_heads * c.head_dim, kv_dim = c.num_key_value_heads * c.head_dim;
  int rank = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const cuda::DeviceLayerAdapters& a = layers[l];
    const int layer = int(l);
    check_adapter(a.q_proj, layer, "q_proj", 1, hidden, q_dim);
    check_adapter(a.k_proj, layer, "k_proj", 1, hidden, kv_dim);
    check_adapter(a.v_proj, layer, "v_proj", 1, hidden, kv_dim);
    check_adapter(a.o_proj, layer, "o_proj", 1, q_dim, hidden);
    check_adapter(a.gate_up_proj, layer, "gate_up_proj", experts, hidden, 2 * c.intermediate_size);
    check_adapter(a.down_proj, layer, "down_proj", experts, c.intermediate_size, hidden);
    for (const cuda::DeviceAdapter* ad : {&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &a.gate_up_proj, &a.down_proj}) {
      if (ad->active()) rank = std::max(rank, ad->r);
    }
  }
  // Adapters set after allocate() with a larger rank than the workspace holds: grow lora_u
  // alone (every other buffer keeps its address).
  if (rank > m.lora_rank && m.kv_pages > 0) {
    const size_t old_bytes = m.ws.lora_u.bytes();
    m.ws.lora_u = {};
    m.ws.lora_u = DeviceBuffer<bf16>(Workspace::lora_u_count(m.capacity, c, rank), "LoRA activations");
    m.workspace_bytes += m.ws.lora_u.bytes() - old_bytes;
  }
  m.lora_rank = std::max(m.lora_rank, rank);
  m.adapters.assign(layers.begin(), layers.end());
}

void CudaModel::forward(int n_tokens, int n_tiles, int n_sequences, bool sample, cudaStream_t stream) {
  Impl& m = *impl_;
  const GptOssConfig& c = m.config;
  const StepCapacity& cap = m.capacity;
  OSSRL_CHECK(m.kv_pages > 0, "CUDA model: forward before allocate()");
  OSSRL_CHECK(n_tokens >= 0 && n_tokens <= cap.max_tokens && n_tiles >= 0 && n_tiles <= cap.max_tiles &&
                  n_sequences >= 0 && n_sequences <= cap.max_sequences,
              "CUDA model: a step of {} tokens, {} tiles, {} sequences exceeds the capacity ({}, {}, {})",
              n_tokens, n_tiles, n_sequences, cap.max_tokens, cap.max_tiles, cap.max_sequences);
  if (n_tokens == 0) return;
  cuda::Blas& blas = m.blas_for(stream);
  Workspace& ws = m.ws;
  const StepBuffers& step = m.step;
  const int hidden = c.hidden_size, heads = c.num_attention_heads, kv_heads = c.num_key_value_heads;
  const int head_dim = c.head_dim, experts = c.num_local_experts, k = c.experts_per_token;
  const int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
  const int qkv_dim = q_dim + 2 * kv_dim;
  const float eps = float(c.rms_norm_eps);
  ProfiledStep profile(m.profiler, stream, n_tokens, n_sequences);

  cuda::embedding_forward(ws.residual.data(), m.weights.embedding_table(), step.tokens, n_tokens, hidden, stream);
  profile.mark(Op::Embedding);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const DeviceLayer& w = m.weights.layers[size_t(l)];
    // The policy's adapters (cuda/lora.h), or null: the base model.
    const cuda::DeviceLayerAdapters* lora = m.adapters.empty() ? nullptr : &m.adapters[size_t(l)];
    bf16* lora_u = ws.lora_u.data();
    // residual += o_proj(attention(rope(qkv(rmsnorm(residual)))))
    bf16* k_cache = m.layer_kv(l, 0);
    bf16* v_cache = m.layer_kv(l, 1);
    const cuda::QkvRopeOperands qkv_rope{.q_out = ws.q.data(),
                                         .k_cache = k_cache,
                                         .v_cache = v_cache,
                                         .residual = ws.residual.data(),
                                         .norm_weight = w.input_layernorm.data(),
                                         .eps = eps,
                                         .w = w.qkv.data(),
                                         .bias = w.qkv_bias.data(),
                                         .positions = step.positions,
                                         .kv_slots = step.kv_slots,
                                         .inv_freq = m.weights.inv_freq.data(),
                                         .attention_scaling = m.weights.attention_scaling,
                                         .n = n_tokens,
                                         .hidden = hidden,
                                         .heads = heads,
                                         .kv_heads = kv_heads,
                                         .head_dim = head_dim};
    if (lora == nullptr && cuda::skinny_qkv_rope_fits(qkv_rope)) {
      // Small steps without adapters (LoRA reads the normed rows): norm, qkv, rope and the KV
      // write in one launch, where three cost more in launch gaps than in work. Timed as qkv.
      profile.mark(Op::AttnNorm);
      cuda::skinny_qkv_rope_forward(qkv_rope, stream);
      profile.mark(Op::QkvProj);
    } else {
      cuda::rmsnorm_forward(ws.normed.data(), ws.residual.data(), w.input_layernorm.data(), nullptr, n_tokens,
                            hidden, eps, stream);
      profile.mark(Op::AttnNorm);
      cuda::linear_forward(blas, ws.qkv.data(), ws.normed.data(), w.qkv.data(), w.qkv_bias.data(), n_tokens, hidden,
                           qkv_dim, false);
      if (lora != nullptr) {
        // Each update into its own columns of the fused [n, q | k | v] output.
        cuda::lora_forward(blas, ws.qkv.data(), qkv_dim, ws.normed.data(), n_tokens, lora->q_proj, lora_u);
        cuda::lora_forward(blas, ws.qkv.data() + q_dim, qkv_dim, ws.normed.data(), n_tokens, lora->k_proj, lora_u);
        cuda::lora_forward(blas, ws.qkv.data() + q_dim + kv_dim, qkv_dim, ws.normed.data(), n_tokens, lora->v_proj,
                           lora_u);
      }
      profile.mark(Op::QkvProj);
      cuda::rope_qkv_forward(ws.q.data(), k_cache, v_cache, ws.qkv.data(), step.positions, step.kv_slots,
                             m.weights.inv_freq.data(), m.weights.attention_scaling, n_tokens, heads, kv_heads,
                             head_dim, stream);
    }
    profile.mark(Op::RopeKv);
    const cuda::PagedKv kv{k_cache, v_cache, step.block_tables, cap.max_pages_per_seq, m.page_size};
    const float* sinks = lora != nullptr && lora->sinks != nullptr ? lora->sinks : w.sinks.data();
    // A step of one token per tile is a decode step (the engine builds no empty tiles).
    cuda::paged_attention_forward(ws.attention.data(), ws.q.data(), kv, sinks, step.positions, step.tiles, n_tiles,
                                  heads, kv_heads, head_dim, w.sliding_window, stream,
                                  n_tokens == n_tiles ? 1 : cuda::kAttentionTileQueries);
    profile.mark(Op::Attention);
    cuda::linear_forward(blas, ws.residual.data(), ws.attention.data(), w.o_proj.data(), w.o_bias.data(), n_tokens,
                         q_dim, hidden, true);
    if (lora != nullptr) {
      cuda::lora_forward(blas, ws.residual.data(), hidden, ws.attention.data(), n_tokens, lora->o_proj, lora_u);
    }
    profile.mark(Op::OProj);

    // residual += Σ_s weight_s · expert_s(rmsnorm(residual)) over the top-k experts
    if (cuda::moe_route_fusable(n_tokens, hidden, experts, k)) {
      // Small decode steps: norm, router, top-k and grouping in one launch, where four cost
      // more in launches and near-empty grids than in work. Timed as the router.
      profile.mark(Op::MoeNorm);
      cuda::moe_route_fused(ws.normed.data(), ws.router_logits.data(), ws.expert_index.data(),
                            ws.expert_weight.data(), ws.expert_offsets.data(), ws.sorted_assignments.data(),
                            ws.residual.data(), w.post_attention_layernorm.data(),
                            w.router.data(), w.router_bias.data(), n_tokens, hidden, experts, k, eps, stream);
      profile.mark(Op::Router);
    } else {
      cuda::rmsnorm_forward(ws.normed.data(), ws.residual.data(), w.post_attention_layernorm.data(), nullptr,
                            n_tokens, hidden, eps, stream);
      profile.mark(Op::MoeNorm);
      cuda::linear_forward(blas, ws.router_logits.data(), ws.normed.data(), w.router.data(), nullptr, n_tokens,
                           hidden, experts, false);
      profile.mark(Op::Router);
      cuda::router_topk_forward(ws.expert_index.data(), ws.expert_weight.data(), ws.router_logits.data(),
                                w.router_bias.data(), n_tokens, experts, k, stream);
      cuda::moe_group_by_expert(ws.expert_offsets.data(), ws.sorted_assignments.data(), ws.expert_index.data(),
                                n_tokens, k, experts, stream);
    }
    profile.mark(Op::TopkGroup);
    cuda::moe_gate_up_swiglu(ws.swiglu.data(), ws.normed.data(), ws.sorted_assignments.data(),
                             ws.expert_offsets.data(), n_tokens, k, w.gate_up.view(), float(c.swiglu_limit), stream,
                             lora != nullptr ? &lora->gate_up_proj : nullptr, lora_u);
    profile.mark(Op::MoeGateUp);
    cuda::moe_down(ws.expert_out.data(), ws.swiglu.data(), ws.sorted_assignments.data(), ws.expert_offsets.data(),
                   n_tokens, k, w.down.view(), stream, lora != nullptr ? &lora->down_proj : nullptr, lora_u);
    profile.mark(Op::MoeDown);
    cuda::moe_combine(ws.residual.data(), ws.expert_out.data(), ws.expert_weight.data(), n_tokens, k, hidden, stream);
    profile.mark(Op::MoeCombine);
  }
  if (n_sequences == 0) return;
  // Only the rows whose next-token logits are wanted go through the final norm and lm_head.
  cuda::rmsnorm_forward(ws.final_normed.data(), ws.residual.data(), m.weights.norm.data(), step.logit_rows, n_sequences,
                        hidden, eps, stream);
  profile.mark(Op::FinalNorm);
  cuda::linear_forward(blas, step.logits, ws.final_normed.data(), m.weights.lm_head_weight(), nullptr, n_sequences, hidden,
                       c.vocab_size, false);
  profile.mark(Op::LmHead);
  if (sample) {
    cuda::sample_tokens(step.sampled, step.logprobs, step.logits, step.params, step.rng_keys, step.rng_draws,
                        n_sequences, c.vocab_size, stream);
    profile.mark(Op::Sampling);
  }
}

}  // namespace ossrl
