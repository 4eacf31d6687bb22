#include "engine/cuda_engine.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <utility>

#include "core/error.h"
#include "cuda/device.h"
#include "cuda/buffer.h"
#include "cuda/check.h"
#include "cuda/sampling.h"
#include "engine/kv_pages.h"

namespace ossrl {

namespace {

using Clock = std::chrono::steady_clock;
using cuda::QueryTile;
constexpr int kTileQueries = cuda::kAttentionTileQueries;
constexpr double kGiB = double(1 << 30);

// Page-locked host memory: a step's inputs are staged here so that their copies to the GPU
// are asynchronous DMA and its outputs come back the same way.
template <class T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t count) {
    OSSRL_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&data_), std::max<size_t>(count, 1) * sizeof(T)));
  }
  PinnedBuffer(PinnedBuffer&& other) noexcept : data_(std::exchange(other.data_, nullptr)) {}
  PinnedBuffer& operator=(PinnedBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    return *this;
  }
  ~PinnedBuffer() {
    if (data_ != nullptr) cudaFreeHost(data_);
  }
  T* data() { return data_; }
  T& operator[](size_t i) { return data_[i]; }

 private:
  T* data_ = nullptr;
};

class Stream {
 public:
  Stream() { OSSRL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(stream_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  operator cudaStream_t() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// K and V of page_size positions in every layer, bf16 (CudaModel's cache layout).
size_t kv_page_bytes(const GptOssConfig& c, int page_size) {
  return size_t(2) * size_t(c.num_hidden_layers) * size_t(page_size) * size_t(c.num_key_value_heads) *
         size_t(c.head_dim) * sizeof(uint16_t);
}

template <class T>
void upload(T* device, T* host, int count, cudaStream_t stream) {
  if (count > 0) {
    OSSRL_CUDA_CHECK(cudaMemcpyAsync(device, host, size_t(count) * sizeof(T), cudaMemcpyHostToDevice, stream));
  }
}

template <class T>
void download(T* host, const T* device, int count, cudaStream_t stream) {
  if (count > 0) {
    OSSRL_CUDA_CHECK(cudaMemcpyAsync(host, device, size_t(count) * sizeof(T), cudaMemcpyDeviceToHost, stream));
  }
}

void check_tokens(std::span<const int32_t> tokens, int vocab, const char* what) {
  for (size_t t = 0; t < tokens.size(); ++t) {
    OSSRL_CHECK(tokens[t] >= 0 && tokens[t] < vocab, "{}: token {} at index {} is outside the vocabulary [0, {})",
                what, tokens[t], t, vocab);
  }
}

// How a step runs: prompt tokens (eager forward, then sampling), decode tokens only
// (replayed from a graph when graphs are on), or scoring (eager, every fed token's log-prob).
enum class StepKind { Prefill, Decode, Score };

// One prompt of a generate() call.
struct Request {
  std::span<const int32_t> prompt;
  uint64_t rng_key = 0;
  int group = -1;  // PrefixGroup index; -1: no other prompt is the same
};

// Identical prompts whose completions share the prompt's whole pages.
struct PrefixGroup {
  int shared_positions = 0;  // a multiple of page_size, short of the prompt's last token
  int queued = 0;            // members not yet admitted
  bool leader_admitted = false;
  // Holds the shared pages from when the leader has prefilled them until every member holds
  // them itself (the leader may finish first); -1 before and after.
  KvPages::SequenceId holder = -1;
};

// A sequence holding a slot (a row of the block tables) and KV pages.
struct Running {
  int request = 0;
  int slot = 0;
  KvPages::SequenceId seq = 0;
  int length = 0;           // positions in the cache
  int pages_written = 0;    // block-table entries copied to the host mirror
  int32_t next_token = 0;   // the last sample: the next decode step's input
  int leads_group = -1;     // the group whose shared prefix this sequence prefills
};

}  // namespace

struct CudaEngine::Impl {
  Impl(CudaModel& model, const EngineOptions& options);
  ~Impl();

  int choose_kv_pages();
  void reset_scheduler();
  int acquire_slot();
  void release_slot(int slot) { free_slots.push_back(slot); }

  // Step assembly, into the pinned staging arrays.
  void begin_step() { n_tokens = n_tiles = n_rows = 0; }
  // Appends `tokens` of the sequence in block-table row `slot`, at positions first_position
  // onward, cut into attention tiles; returns the index of the first. The pages must exist.
  int add_tokens(int slot, KvPages::SequenceId seq, std::span<const int32_t> tokens, int first_position);
  // A logit row for the step's token `token_index`; returns the row.
  int add_logit_row(int token_index);
  // Copies the sequence's new block-table entries into the host mirror.
  void write_block_table(int slot, KvPages::SequenceId seq, int& pages_written);
  // Runs the assembled step and waits for its outputs (sampled/logprobs staging arrays).
  void run_step(StepKind kind);
  cudaGraphExec_t decode_graph(int bucket);

  std::vector<Generation> generate(const std::vector<std::vector<int32_t>>& prompts, const GenerateOptions& options);
  std::vector<float> log_probs(std::span<const int32_t> tokens, std::span<const int32_t> offsets);

  CudaModel& model;
  const EngineOptions options;
  const int vocab;
  StepCapacity capacity;
  int kv_pages = 0;
  Stream stream;
  std::unique_ptr<KvPages> kv;
  std::vector<int> free_slots;
  std::map<int, cudaGraphExec_t> graphs;  // decode step graphs by bucket size
  EngineStats stats;

  // Staging for one step's inputs: [max_tokens], [max_tiles], [max_sequences].
  PinnedBuffer<int32_t> tokens, positions, kv_slots;
  PinnedBuffer<QueryTile> tiles;
  PinnedBuffer<int32_t> logit_rows, targets;
  PinnedBuffer<uint64_t> rng_keys, rng_draws;
  int n_tokens = 0, n_tiles = 0, n_rows = 0;
  // Outputs [max_sequences].
  PinnedBuffer<int32_t> sampled;
  PinnedBuffer<float> logprobs;
  // The block tables [max_sequences, max_pages_per_seq]; entries [dirty_begin, dirty_end)
  // changed since the last upload.
  PinnedBuffer<int32_t> block_tables;
  size_t dirty_begin = std::numeric_limits<size_t>::max(), dirty_end = 0;
  // Scoring: the token each logit row is scored on, and its log-prob.
  cuda::DeviceBuffer<int32_t> targets_device;
  cuda::DeviceBuffer<float> scores_device;
};

CudaEngine::Impl::Impl(CudaModel& model_, const EngineOptions& options_)
    : model(model_), options(options_), vocab(model_.config().vocab_size) {
  OSSRL_CHECK(options.max_batch >= 1 && options.prefill_chunk >= 1 && options.page_size >= 1 &&
                  options.max_sequence_length >= 2 && options.kv_pages >= 0 && options.kv_cache_gb >= 0.0,
              "engine options: need max batch, prefill chunk, page size >= 1, max sequence length >= 2 and a "
              "KV cache size >= 0 (got {}, {}, {}, {}, {} pages, {} GiB)",
              options.max_batch, options.prefill_chunk, options.page_size, options.max_sequence_length,
              options.kv_pages, options.kv_cache_gb);
  capacity.max_sequences = options.max_batch;
  capacity.max_tokens = options.prefill_chunk + options.max_batch;
  // A prefilling sequence's n tokens take ceil(n / 16) <= n / 16 + 1 tiles, a decoding one 1.
  capacity.max_tiles = (options.prefill_chunk + kTileQueries - 1) / kTileQueries + options.max_batch;
  capacity.max_pages_per_seq = (options.max_sequence_length + options.page_size - 1) / options.page_size;

  kv_pages = choose_kv_pages();
  model.allocate(capacity, kv_pages, options.page_size);

  const auto tokens_n = size_t(capacity.max_tokens), rows_n = size_t(capacity.max_sequences);
  tokens = PinnedBuffer<int32_t>(tokens_n);
  positions = PinnedBuffer<int32_t>(tokens_n);
  kv_slots = PinnedBuffer<int32_t>(tokens_n);
  tiles = PinnedBuffer<QueryTile>(size_t(capacity.max_tiles));
  logit_rows = PinnedBuffer<int32_t>(rows_n);
  targets = PinnedBuffer<int32_t>(rows_n);
  rng_keys = PinnedBuffer<uint64_t>(rows_n);
  rng_draws = PinnedBuffer<uint64_t>(rows_n);
  sampled = PinnedBuffer<int32_t>(rows_n);
  logprobs = PinnedBuffer<float>(rows_n);
  const size_t table_entries = rows_n * size_t(capacity.max_pages_per_seq);
  block_tables = PinnedBuffer<int32_t>(table_entries);
  std::fill_n(block_tables.data(), table_entries, 0);
  upload(model.step().block_tables, block_tables.data(), int(table_entries), stream);
  targets_device = cuda::DeviceBuffer<int32_t>(rows_n, "scoring targets");
  scores_device = cuda::DeviceBuffer<float>(rows_n, "scoring log-probs");
  OSSRL_CUDA_CHECK(cudaStreamSynchronize(stream));
  reset_scheduler();
}

CudaEngine::Impl::~Impl() {
  for (auto& [bucket, graph] : graphs) cudaGraphExecDestroy(graph);
}

int CudaEngine::Impl::choose_kv_pages() {
  const size_t page_bytes = kv_page_bytes(model.config(), options.page_size);
  if (options.kv_pages > 0) return options.kv_pages;
  double budget = options.kv_cache_gb * kGiB;
  if (budget == 0.0) {
    // 90% of what is free beside the weights and this capacity's workspace. The workspace is
    // measured, then given back (a one-token allocation replaces it) before measuring what is
    // free, so the final allocation never holds two workspaces at once.
    model.allocate(capacity, 1, options.page_size);
    const size_t workspace = model.memory_plan().workspace;
    model.allocate(StepCapacity{1, 1, 1, 1}, 1, options.page_size);
    budget = 0.9 * double(cuda::memory_free()) - double(workspace);
  }
  const double pages = std::floor(budget / double(page_bytes));
  OSSRL_CHECK(pages >= 1.0,
              "no room for a KV cache: a page of {} positions takes {:.2f} MiB and {:.2f} GiB are left for it "
              "(pass a larger --kv-cache-gb, or lower --max-batch)",
              options.page_size, double(page_bytes) / (1 << 20), budget / kGiB);
  return int(std::min(pages, double(std::numeric_limits<int>::max())));
}

void CudaEngine::Impl::reset_scheduler() {
  kv = std::make_unique<KvPages>(kv_pages, options.page_size);
  free_slots.clear();
  for (int s = capacity.max_sequences - 1; s >= 0; --s) free_slots.push_back(s);
}

int CudaEngine::Impl::acquire_slot() {
  const int slot = free_slots.back();
  free_slots.pop_back();
  return slot;
}

int CudaEngine::Impl::add_tokens(int slot, KvPages::SequenceId seq, std::span<const int32_t> new_tokens,
                                 int first_position) {
  const int count = int(new_tokens.size());
  const int first = n_tokens;
  const int tiles_needed = (count + kTileQueries - 1) / kTileQueries;
  OSSRL_CHECK(n_tokens + count <= capacity.max_tokens && n_tiles + tiles_needed <= capacity.max_tiles,
              "engine: step overflow ({} + {} tokens, {} + {} tiles; capacity {}, {})", n_tokens, count, n_tiles,
              tiles_needed, capacity.max_tokens, capacity.max_tiles);
  for (int j = 0; j < count; ++j) {
    tokens[size_t(first + j)] = new_tokens[size_t(j)];
    positions[size_t(first + j)] = first_position + j;
    kv_slots[size_t(first + j)] = kv->kv_slot(seq, first_position + j);
  }
  for (int j = 0; j < count; j += kTileQueries) {
    tiles[size_t(n_tiles++)] = QueryTile{first + j, std::min(kTileQueries, count - j), slot};
  }
  n_tokens += count;
  return first;
}

int CudaEngine::Impl::add_logit_row(int token_index) {
  OSSRL_CHECK(n_rows < capacity.max_sequences, "engine: more than {} logit rows in a step", capacity.max_sequences);
  logit_rows[size_t(n_rows)] = token_index;
  return n_rows++;
}

void CudaEngine::Impl::write_block_table(int slot, KvPages::SequenceId seq, int& pages_written) {
  const std::span<const int32_t> pages = kv->block_table(seq);
  if (int(pages.size()) <= pages_written) return;
  const size_t row = size_t(slot) * size_t(capacity.max_pages_per_seq);
  for (size_t j = size_t(pages_written); j < pages.size(); ++j) block_tables[row + j] = pages[j];
  dirty_begin = std::min(dirty_begin, row + size_t(pages_written));
  dirty_end = std::max(dirty_end, row + pages.size());
  pages_written = int(pages.size());
}

cudaGraphExec_t CudaEngine::Impl::decode_graph(int bucket) {
  if (const auto it = graphs.find(bucket); it != graphs.end()) return it->second;
  // The graph reads the step arrays at replay, so it is captured once per bucket with nothing
  // in them; the counts are fixed at capture, which is why batches are padded to a bucket.
  cudaGraph_t graph = nullptr;
  OSSRL_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    model.forward(bucket, bucket, bucket, /*sample=*/true, stream);
  } catch (...) {
    // End the capture so the stream is usable again; the original error is the one to report.
    if (cudaStreamEndCapture(stream, &graph) == cudaSuccess && graph != nullptr) cudaGraphDestroy(graph);
    (void)cudaGetLastError();
    throw;
  }
  OSSRL_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  OSSRL_CUDA_CHECK(status);
  graphs.emplace(bucket, exec);
  return exec;
}

void CudaEngine::Impl::run_step(StepKind kind) {
  int step_tokens = n_tokens, step_tiles = n_tiles, step_rows = n_rows;
  cudaGraphExec_t graph = nullptr;
  if (kind == StepKind::Decode && options.cuda_graphs) {
    // Decode steps have one token, one tile and one logit row per sequence. The batch is
    // padded to the bucket with copies of its first token that skip the KV write (slot -1):
    // a copy computes exactly what the original does, so every padding row stays finite
    // (an empty tile would leave its attention rows as whatever the workspace held, and a
    // NaN there could send the router out of range). Their samples are ignored.
    int bucket = 1;
    while (bucket < n_rows) bucket *= 2;
    bucket = std::min(bucket, capacity.max_sequences);
    graph = decode_graph(bucket);
    for (int j = n_rows; j < bucket; ++j) {
      tokens[size_t(j)] = tokens[0];
      positions[size_t(j)] = positions[0];
      kv_slots[size_t(j)] = -1;
      tiles[size_t(j)] = QueryTile{j, 1, tiles[0].seq};
      logit_rows[size_t(j)] = j;
      rng_keys[size_t(j)] = rng_keys[0];
      rng_draws[size_t(j)] = rng_draws[0];
    }
    step_tokens = step_tiles = step_rows = bucket;
  }
  StepBuffers& device = model.step();
  upload(device.tokens, tokens.data(), step_tokens, stream);
  upload(device.positions, positions.data(), step_tokens, stream);
  upload(device.kv_slots, kv_slots.data(), step_tokens, stream);
  upload(device.tiles, tiles.data(), step_tiles, stream);
  upload(device.logit_rows, logit_rows.data(), step_rows, stream);
  if (kind == StepKind::Score) {
    upload(targets_device.data(), targets.data(), step_rows, stream);
  } else {
    upload(device.rng_keys, rng_keys.data(), step_rows, stream);
    upload(device.rng_draws, rng_draws.data(), step_rows, stream);
  }
  if (dirty_begin < dirty_end) {
    upload(device.block_tables + dirty_begin, block_tables.data() + dirty_begin, int(dirty_end - dirty_begin), stream);
    dirty_begin = std::numeric_limits<size_t>::max();
    dirty_end = 0;
  }
  if (graph != nullptr) {
    OSSRL_CUDA_CHECK(cudaGraphLaunch(graph, stream));
    ++stats.graph_replays;
  } else {
    model.forward(step_tokens, step_tiles, step_rows, /*sample=*/kind != StepKind::Score, stream);
  }
  if (kind == StepKind::Score) {
    cuda::token_logprobs(scores_device.data(), device.logits, targets_device.data(), step_rows, vocab, stream);
    download(logprobs.data(), scores_device.data(), n_rows, stream);
  } else {
    download(sampled.data(), device.sampled, n_rows, stream);
    download(logprobs.data(), device.logprobs, n_rows, stream);
  }
  OSSRL_CUDA_CHECK(cudaStreamSynchronize(stream));
  ++stats.steps;
  stats.peak_gpu_bytes = std::max(stats.peak_gpu_bytes, cuda::memory_in_use());
}

std::vector<Generation> CudaEngine::Impl::generate(const std::vector<std::vector<int32_t>>& prompts,
                                                   const GenerateOptions& gen) {
  std::vector<Generation> out(prompts.size());
  if (prompts.empty() || gen.max_new_tokens <= 0) return out;
  // The CPU sampler's own check of the parameters (it throws on a bad one).
  (void)sampling_distribution(std::vector<float>{0.0f}, gen.sampling);
  const int page_size = options.page_size;
  for (size_t i = 0; i < prompts.size(); ++i) {
    OSSRL_CHECK(!prompts[i].empty(), "generate: prompt {} is empty", i);
    check_tokens(prompts[i], vocab, "generate: a prompt");
    OSSRL_CHECK(int64_t(prompts[i].size()) + gen.max_new_tokens - 1 <= options.max_sequence_length,
                "generate: prompt {} ({} tokens) with {} new tokens is longer than the engine's maximum "
                "sequence length {}",
                i, prompts[i].size(), gen.max_new_tokens, options.max_sequence_length);
  }
  reset_scheduler();

  // Every logit row samples with the same parameters: written once, for all rows.
  {
    const std::vector<SamplingParams> params(size_t(capacity.max_sequences), gen.sampling);
    OSSRL_CUDA_CHECK(cudaMemcpyAsync(model.step().params, params.data(), params.size() * sizeof(SamplingParams),
                                     cudaMemcpyHostToDevice, stream));
    OSSRL_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  std::vector<Request> requests(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    requests[i].prompt = prompts[i];
    requests[i].rng_key = SamplingRng(gen.seed, i).key();
  }
  // Identical prompts at least a page and a token long form a group.
  std::vector<PrefixGroup> groups;
  if (options.prefix_sharing) {
    auto by_tokens = [&](size_t a, size_t b) { return prompts[a] < prompts[b]; };
    std::map<size_t, std::vector<int>, decltype(by_tokens)> copies(by_tokens);
    for (size_t i = 0; i < prompts.size(); ++i) copies[i].push_back(int(i));
    for (const auto& [first, members] : copies) {
      const int shared = (int(prompts[first].size()) - 1) / page_size * page_size;
      if (members.size() < 2 || shared == 0) continue;
      for (int i : members) requests[size_t(i)].group = int(groups.size());
      groups.push_back(PrefixGroup{shared, int(members.size())});
    }
  }

  std::vector<int> queue(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) queue[i] = int(i);
  std::vector<Running> running;
  std::vector<int> row_owner;  // running index of each logit row
  while (!queue.empty() || !running.empty()) {
    const auto step_start = Clock::now();

    // Admit queued prompts into free slots, first come first served, while their KV
    // reservation fits. A copy of a prompt whose leader is still prefilling the shared
    // pages waits without holding up the prompts behind it.
    std::vector<int> still_queued;
    bool out_of_pages = false;
    for (int i : queue) {
      const Request& request = requests[size_t(i)];
      PrefixGroup* group = request.group >= 0 ? &groups[size_t(request.group)] : nullptr;
      const bool waits_for_prefix = group != nullptr && group->leader_admitted && group->holder < 0;
      if (free_slots.empty() || out_of_pages || waits_for_prefix) {
        still_queued.push_back(i);
        continue;
      }
      const bool shares = group != nullptr && group->holder >= 0;
      const int start = shares ? group->shared_positions : 0;
      const int written = int(request.prompt.size()) + gen.max_new_tokens - 1;  // the last sample is never fed
      const int reserve = kv->pages_for(written) - start / page_size;
      if (reserve > kv->available_pages()) {
        out_of_pages = true;
        still_queued.push_back(i);
        continue;
      }
      Running r;
      r.request = i;
      r.slot = acquire_slot();
      r.seq = shares ? kv->share_prefix(group->holder, start, reserve) : kv->add_sequence(reserve);
      r.length = start;
      if (group != nullptr) {
        --group->queued;
        if (!group->leader_admitted) {
          group->leader_admitted = true;
          r.leads_group = request.group;
        } else if (group->queued == 0) {
          kv->remove_sequence(group->holder);  // every member now holds the shared pages
          group->holder = -1;
        }
      }
      running.push_back(r);
    }
    queue = std::move(still_queued);
    if (running.empty()) {
      const int i = queue.front();
      fail("generate: prompt {} ({} tokens + {} new) needs {} KV pages of {} positions, but the cache holds {} "
           "({} available); raise --kv-cache-gb or lower --max-new-tokens",
           i, prompts[size_t(i)].size(), gen.max_new_tokens,
           kv->pages_for(int64_t(prompts[size_t(i)].size()) + gen.max_new_tokens - 1), page_size, kv->num_pages(),
           kv->available_pages());
    }

    // The step: one token per decoding sequence, then prompt chunks up to prefill_chunk.
    begin_step();
    row_owner.clear();
    int prompt_tokens = 0;
    auto add_sequence_tokens = [&](size_t index, std::span<const int32_t> new_tokens, bool sample) {
      Running& r = running[index];
      kv->grow(r.seq, r.length + int(new_tokens.size()));
      write_block_table(r.slot, r.seq, r.pages_written);
      const int first = add_tokens(r.slot, r.seq, new_tokens, r.length);
      r.length += int(new_tokens.size());
      if (!sample) return;
      const int row = add_logit_row(first + int(new_tokens.size()) - 1);
      rng_keys[size_t(row)] = requests[size_t(r.request)].rng_key;
      rng_draws[size_t(row)] = out[size_t(r.request)].tokens.size() + 1;  // SamplingRng counts draws from 1
      row_owner.push_back(int(index));
    };
    for (size_t k = 0; k < running.size(); ++k) {
      Running& r = running[k];
      if (r.length >= int(requests[size_t(r.request)].prompt.size())) {
        add_sequence_tokens(k, std::span<const int32_t>(&r.next_token, 1), true);
      }
    }
    for (size_t k = 0; k < running.size() && prompt_tokens < options.prefill_chunk; ++k) {
      const Running& r = running[k];
      const std::span<const int32_t> prompt = requests[size_t(r.request)].prompt;
      if (r.length >= int(prompt.size())) continue;
      const int n = std::min(int(prompt.size()) - r.length, options.prefill_chunk - prompt_tokens);
      const bool completes = r.length + n == int(prompt.size());
      add_sequence_tokens(k, prompt.subspan(size_t(r.length), size_t(n)), completes);
      prompt_tokens += n;
    }
    const StepKind kind = prompt_tokens > 0 ? StepKind::Prefill : StepKind::Decode;
    run_step(kind);

    // Samples: append, and decide who is done.
    std::vector<bool> finished(running.size(), false);
    for (int row = 0; row < n_rows; ++row) {
      const size_t k = size_t(row_owner[size_t(row)]);
      Running& r = running[k];
      Generation& g = out[size_t(r.request)];
      const int32_t token = sampled[size_t(row)];
      g.tokens.push_back(token);
      g.logprobs.push_back(logprobs[size_t(row)]);
      g.stopped = std::find(gen.stop_tokens.begin(), gen.stop_tokens.end(), token) != gen.stop_tokens.end();
      finished[k] = g.stopped || int(g.tokens.size()) >= gen.max_new_tokens;
      r.next_token = token;
    }
    // A leader past the shared pages hands them to its group (before it may be released).
    for (Running& r : running) {
      if (r.leads_group < 0) continue;
      PrefixGroup& group = groups[size_t(r.leads_group)];
      if (r.length < group.shared_positions) continue;
      group.holder = kv->share_prefix(r.seq, group.shared_positions, 0);
      r.leads_group = -1;
    }
    size_t kept = 0;
    for (size_t k = 0; k < running.size(); ++k) {
      if (finished[k]) {
        kv->remove_sequence(running[k].seq);
        release_slot(running[k].slot);
      } else {
        running[kept++] = running[k];
      }
    }
    running.resize(kept);

    const double seconds = std::chrono::duration<double>(Clock::now() - step_start).count();
    stats.prompt_tokens += prompt_tokens;
    stats.sampled_tokens += n_rows;
    if (kind == StepKind::Decode) {
      ++stats.decode_steps;
      stats.decode_seconds += seconds;
    } else {
      ++stats.prefill_steps;
      stats.prefill_seconds += seconds;
    }
  }
  return out;
}

std::vector<float> CudaEngine::Impl::log_probs(std::span<const int32_t> all_tokens, std::span<const int32_t> offsets) {
  OSSRL_CHECK(!offsets.empty() && offsets.front() == 0 && size_t(offsets.back()) == all_tokens.size(),
              "log_probs: offsets must run from 0 to the number of tokens ({})", all_tokens.size());
  const int n_sequences = int(offsets.size()) - 1;
  for (int b = 0; b < n_sequences; ++b) {
    const int n = offsets[size_t(b) + 1] - offsets[size_t(b)];
    OSSRL_CHECK(n >= 1, "log_probs: sequence {} is empty", b);
    OSSRL_CHECK(n - 1 <= options.max_sequence_length,
                "log_probs: sequence {} ({} tokens) is longer than the engine's maximum sequence length {}", b, n,
                options.max_sequence_length);
  }
  check_tokens(all_tokens, vocab, "log_probs");
  reset_scheduler();
  std::vector<float> out(all_tokens.size(), 0.0f);

  // Each sequence feeds its tokens but the last, every one with a logit row scored on the
  // token after it; a step takes up to max_sequences rows, a long sequence spans steps.
  struct Scoring {
    int sequence = 0;
    int slot = 0;
    KvPages::SequenceId seq = 0;
    int fed = 0;
    int pages_written = 0;
  };
  std::vector<Scoring> active;
  std::vector<int> scored_index;  // index in `out` of each logit row
  int next = 0;
  while (next < n_sequences || !active.empty()) {
    const auto step_start = Clock::now();
    begin_step();
    scored_index.clear();
    auto feed = [&](Scoring& s) {
      const int begin = offsets[size_t(s.sequence)];
      const int n = offsets[size_t(s.sequence) + 1] - begin;
      const int m = std::min(n - 1 - s.fed, capacity.max_sequences - n_rows);
      if (m <= 0) return;
      kv->grow(s.seq, s.fed + m);
      write_block_table(s.slot, s.seq, s.pages_written);
      const int first = add_tokens(s.slot, s.seq, all_tokens.subspan(size_t(begin + s.fed), size_t(m)), s.fed);
      for (int j = 0; j < m; ++j) {
        const int row = add_logit_row(first + j);
        const int scored = begin + s.fed + j + 1;
        targets[size_t(row)] = all_tokens[size_t(scored)];
        scored_index.push_back(scored);
      }
      s.fed += m;
    };
    for (Scoring& s : active) feed(s);
    while (n_rows < capacity.max_sequences && next < n_sequences) {
      const int n = offsets[size_t(next) + 1] - offsets[size_t(next)];
      if (n == 1) {  // nothing to score: its only token's log-prob is 0
        ++next;
        continue;
      }
      const int reserve = kv->pages_for(n - 1);
      if (reserve > kv->available_pages() || free_slots.empty()) {
        OSSRL_CHECK(!active.empty(),
                    "log_probs: sequence {} ({} tokens) needs {} KV pages of {} positions, but the cache holds {}; "
                    "raise --kv-cache-gb",
                    next, n, reserve, options.page_size, kv->num_pages());
        break;
      }
      active.push_back(Scoring{next, acquire_slot(), kv->add_sequence(reserve)});
      feed(active.back());
      ++next;
    }
    if (n_rows == 0) break;  // only one-token sequences were left
    run_step(StepKind::Score);
    for (int row = 0; row < n_rows; ++row) out[size_t(scored_index[size_t(row)])] = logprobs[size_t(row)];

    size_t kept = 0;
    for (Scoring& s : active) {
      const int n = offsets[size_t(s.sequence) + 1] - offsets[size_t(s.sequence)];
      if (s.fed == n - 1) {
        kv->remove_sequence(s.seq);
        release_slot(s.slot);
      } else {
        active[kept++] = s;
      }
    }
    active.resize(kept);
    ++stats.prefill_steps;
    stats.scored_tokens += n_rows;
    stats.prefill_seconds += std::chrono::duration<double>(Clock::now() - step_start).count();
  }
  return out;
}

CudaEngine::CudaEngine(CudaModel& model, const EngineOptions& options)
    : impl_(std::make_unique<Impl>(model, options)) {}
CudaEngine::~CudaEngine() {
  CudaModel& model = impl_->model;
  impl_.reset();    // the graphs first: they point into the model's buffers
  model.release();  // the KV cache and workspace go with the engine
}

std::vector<Generation> CudaEngine::generate(const std::vector<std::vector<int32_t>>& prompts,
                                             const GenerateOptions& options) {
  return impl_->generate(prompts, options);
}

std::vector<float> CudaEngine::log_probs(std::span<const int32_t> tokens, std::span<const int32_t> offsets) {
  return impl_->log_probs(tokens, offsets);
}

MemoryPlan CudaEngine::memory_plan() const { return impl_->model.memory_plan(); }
const EngineStats& CudaEngine::stats() const { return impl_->stats; }
void CudaEngine::reset_stats() { impl_->stats = EngineStats{}; }

std::string describe(const MemoryPlan& plan) {
  std::string text = fmt::format(
      "weights {:.2f} GiB, KV cache {} pages x {} positions = {:.2f} GiB, workspace {:.2f} GiB, total {:.2f} GiB",
      double(plan.weights) / kGiB, plan.kv_pages, plan.page_size, double(plan.kv_cache) / kGiB,
      double(plan.workspace) / kGiB, double(plan.weights + plan.kv_cache + plan.workspace) / kGiB);
  if (plan.host_embeddings > 0) {
    text += fmt::format("; embeddings on the host: {:.2f} GiB", double(plan.host_embeddings) / kGiB);
  }
  return text;
}

}  // namespace ossrl
