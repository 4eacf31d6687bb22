// `ossrl bench generate`: rollout throughput of the GPU engine on a model of the gpt-oss-20b or
// -120b shape with random weights (no checkpoint needed), for a list of batch sizes, next to
// the memory-bandwidth roofline of its decode steps; with --profile, the time and bytes of each
// op class of a decode step.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "cuda/device.h"
#include "engine/cuda_engine.h"
#include "engine/op_profiler.h"

namespace ossrl::cli {

namespace {

constexpr double kGiB = double(1 << 30);
// The HBM bandwidth the roofline assumes: H100 SXM's 3.35 TB/s less what is reachable in practice.
constexpr double kBandwidth = 3.0e12;
// Decode steps of the whole batch timed op by op under --profile.
constexpr int kProfileSteps = 20;

struct BenchArgs {
  std::string model = "20b";
  std::string experts = "mxfp4";
  int prompt_tokens = 256;
  int new_tokens = 256;
  std::vector<int> batches = {1, 64, 256};
  double kv_cache_gb = 0.0;
  int prefill_chunk = 8192;
  int page_size = 16;
  float temperature = 1.0f;
  bool cuda_graphs = true;
  bool profile = false;
  bool offload_embeddings = false;
  uint64_t seed = 0;
  std::string json_path;
};

// The least each op class of a decode step of `batch` sequences moves through GPU memory:
// the weights it uses, read once; the K and V of every position each sequence attends to;
// its activations read and written once. The roofline counts weights and KV only.
struct OpTraffic {
  double weights = 0;
  double kv = 0;
  double activations = 0;
  double total() const { return weights + kv + activations; }
};

struct DecodeTraffic {
  std::array<OpTraffic, kOpCount> ops{};  // indexed by Op
  double distinct_experts = 0;            // per layer
  double weight_bytes() const { return sum(&OpTraffic::weights); }
  double kv_bytes() const { return sum(&OpTraffic::kv); }
  OpTraffic& operator[](Op op) { return ops[size_t(op)]; }
  const OpTraffic& operator[](Op op) const { return ops[size_t(op)]; }

 private:
  double sum(double OpTraffic::*part) const {
    double total = 0;
    for (const OpTraffic& t : ops) total += t.*part;
    return total;
  }
};

DecodeTraffic decode_traffic(const GptOssConfig& c, bool mxfp4, int batch, double context) {
  constexpr double bf16 = 2, f32 = 4, i32 = 4;
  const double hidden = c.hidden_size, inter = c.intermediate_size, experts = c.num_local_experts;
  const double layers = c.num_hidden_layers, vocab = c.vocab_size, heads = c.num_attention_heads;
  const double b = batch, k = c.experts_per_token, assignments = b * k;
  const double q_width = heads * c.head_dim;
  const double kv_width = double(c.num_key_value_heads) * c.head_dim;
  const double qkv_width = q_width + 2 * kv_width;
  // MXFP4 holds 4 bits a weight and a scale byte per 32 weights.
  const double expert_weight = mxfp4 ? 0.5 + 1.0 / 32 : bf16;
  DecodeTraffic t;
  // B tokens each routed to k of E experts, uniformly: an expert is missed by all of them with
  // probability (1 - k/E)^B, so E (1 - (1 - k/E)^B) distinct experts are read per layer.
  t.distinct_experts = experts * (1.0 - std::pow(1.0 - k / experts, b));
  const double distinct = t.distinct_experts;
  // Per layer below, times the layers; the residual stream is fp32, matmul inputs bf16.
  const OpTraffic norm{layers * hidden * f32, 0, layers * b * hidden * (f32 + bf16)};
  t[Op::Embedding] = {b * hidden * bf16, 0, b * (i32 + hidden * f32)};
  t[Op::AttnNorm] = norm;
  t[Op::QkvProj] = {layers * (hidden * qkv_width * bf16 + qkv_width * f32), 0,
                    layers * b * (hidden * bf16 + qkv_width * f32)};
  // qkv in; rotated q out, k and v into the cache.
  t[Op::RopeKv] = {0, 0, layers * b * (qkv_width * f32 + q_width * f32 + 2 * kv_width * bf16)};
  t[Op::Attention] = {layers * heads * f32, 0, layers * b * q_width * (f32 + bf16)};  // sinks; q in, out
  for (AttentionType type : c.layer_types) {
    const double visible = type == AttentionType::Sliding ? std::min(context, double(c.sliding_window)) : context;
    t[Op::Attention].kv += b * visible * 2 * kv_width * bf16;
  }
  // o_proj accumulates into the residual: read and written.
  t[Op::OProj] = {layers * (q_width * hidden * bf16 + hidden * f32), 0,
                  layers * b * (q_width * bf16 + 2 * hidden * f32)};
  t[Op::MoeNorm] = norm;
  t[Op::Router] = {layers * hidden * experts * bf16, 0, layers * b * (hidden * bf16 + experts * f32)};
  // Logits and the router bias in; expert ids and weights out; then ids in, grouped ids out.
  t[Op::TopkGroup] = {layers * experts * f32, 0,
                      layers * (b * experts * f32 + assignments * (i32 + f32) + 2 * assignments * i32)};
  // Each assignment reads its token's normed row and writes its SwiGLU row, then reads that
  // row back and writes its expert's output row.
  t[Op::MoeGateUp] = {layers * distinct * (2 * inter * hidden * expert_weight + 2 * inter * f32), 0,
                      layers * assignments * (hidden * bf16 + inter * bf16)};
  t[Op::MoeDown] = {layers * distinct * (hidden * inter * expert_weight + hidden * f32), 0,
                    layers * assignments * (inter * bf16 + hidden * f32)};
  t[Op::MoeCombine] = {0, 0, layers * (assignments * (hidden * f32 + f32) + b * 2 * hidden * f32)};
  t[Op::FinalNorm] = {hidden * f32, 0, b * hidden * (f32 + bf16)};
  t[Op::LmHead] = {vocab * hidden * bf16, 0, b * (hidden * bf16 + vocab * f32)};  // every row of lm_head
  t[Op::Sampling] = {0, 0, b * vocab * f32};  // one pass over the logits
  return t;
}

std::vector<std::vector<int32_t>> random_prompts(int batch, int length, int vocab, uint64_t seed) {
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(batch),
                                            std::vector<int32_t>(static_cast<size_t>(length)));
  for (int b = 0; b < batch; ++b) {
    SamplingRng rng(seed, uint64_t(b));
    for (int32_t& t : prompts[size_t(b)]) t = int32_t(rng.next() * vocab);
  }
  return prompts;
}

// Mean GPU time by op class of the eager decode steps of the whole batch in `generation`
// (engine/op_profiler.h), on an engine of its own with graphs off.
OpTimes profile_decode(CudaModel& model, EngineOptions options, const std::vector<std::vector<int32_t>>& prompts,
                       const GenerateOptions& generation) {
  options.cuda_graphs = false;
  CudaEngine engine(model, options);
  // Warm-up on the same steps, so every kernel of every shape is loaded before a step is held:
  // a module loaded while the hold blocks the stream would wait the hold out.
  (void)engine.generate(prompts, generation);
  OpProfiler profiler(options.max_batch);
  // Detaches the profiler however generate() ends, before the profiler goes.
  struct Attached {
    CudaModel& model;
    ~Attached() { model.set_profiler(nullptr); }
  } attached{model};
  model.set_profiler(&profiler);
  (void)engine.generate(prompts, generation);
  const OpTimes times = profiler.times();
  OSSRL_CHECK(times.steps > 0, "bench --profile: no decode step of the whole batch of {} was timed", options.max_batch);
  return times;
}

// One batch's op table: time per step, share of the step, the bytes decode_traffic says the op
// moves and the bandwidth that implies.
std::string format_profile(int batch, const OpTimes& times, const DecodeTraffic& traffic, double graph_step_ms) {
  std::string out = fmt::format(
      "\nbatch {}: mean of {} eager decode steps, GPU time between CUDA events around each op class (layers "
      "summed): {:.3f} ms a step, against {:.3f} ms for a step replayed from a graph\n",
      batch, times.steps, times.step_ms(), graph_step_ms);
  if (times.ungated_steps > 0) {
    out += fmt::format("({} of the steps were not held until enqueued: their times include launch gaps)\n",
                       times.ungated_steps);
  }
  out += fmt::format("{:<12} {:>8} {:>7} {:>9} {:>8} {:>14}\n", "op", "ms/step", "% step", "MB moved", "GB/s",
                     fmt::format("% of {:.1f} TB/s", kBandwidth / 1e12));
  auto line = [&](const char* name, double ms, double bytes) {
    const double bytes_per_second = ms > 0 ? bytes / (ms * 1e-3) : 0.0;
    out += fmt::format("{:<12} {:>8.3f} {:>7.1f} {:>9.2f} {:>8.0f} {:>14.1f}\n", name, ms,
                       100.0 * ms / times.step_ms(), bytes / 1e6, bytes_per_second / 1e9,
                       100.0 * bytes_per_second / kBandwidth);
  };
  double total_bytes = 0;
  for (size_t i = 0; i < kOpCount; ++i) {
    line(op_name(Op(i)), times.ms[i], traffic.ops[i].total());
    total_bytes += traffic.ops[i].total();
  }
  line("total", times.step_ms(), total_bytes);
  return out;
}

nlohmann::json profile_json(const OpTimes& times, const DecodeTraffic& traffic) {
  nlohmann::json ops = nlohmann::json::object();
  for (size_t i = 0; i < kOpCount; ++i) {
    ops[op_name(Op(i))] = {{"ms_per_step", times.ms[i]}, {"bytes", traffic.ops[i].total()}};
  }
  return {{"steps", times.steps}, {"ungated_steps", times.ungated_steps}, {"ops", ops}};
}

void run(const BenchArgs& args) {
  using Clock = std::chrono::steady_clock;
  OSSRL_CHECK(cuda::device_count() > 0, "bench generate: no GPU on this machine");
  const GptOssConfig config = args.model == "120b" ? GptOssConfig::gpt_oss_120b() : GptOssConfig::gpt_oss_20b();
  const bool mxfp4 = args.experts == "mxfp4";
  fmt::print("{}\n", cuda::device_summary(0));
  const auto load_start = Clock::now();
  const auto model =
      CudaModel::random(config, mxfp4, args.seed, ModelOptions{.offload_embeddings = args.offload_embeddings});
  fmt::print("gpt-oss-{} shape, random weights, {} experts, ready in {:.1f} s\n", args.model, args.experts,
             std::chrono::duration<double>(Clock::now() - load_start).count());
  fmt::print("prompts of {} random tokens, {} new tokens each (no stop tokens), temperature {}, CUDA graphs {}\n",
             args.prompt_tokens, args.new_tokens, args.temperature, args.cuda_graphs ? "on" : "off");

  GenerateOptions generation;
  generation.sampling.temperature = args.temperature;
  generation.seed = args.seed;
  const int positions = args.prompt_tokens + args.new_tokens;
  const double mean_context = args.prompt_tokens + args.new_tokens / 2.0;

  nlohmann::json rows = nlohmann::json::array();
  std::vector<std::string> table, profiles;
  for (int batch : args.batches) {
    EngineOptions options;
    options.max_batch = batch;
    options.prefill_chunk = args.prefill_chunk;
    options.page_size = args.page_size;
    options.max_sequence_length = positions;
    options.cuda_graphs = args.cuda_graphs;
    options.prefix_sharing = false;  // random prompts differ anyway
    options.kv_cache_gb = args.kv_cache_gb;
    if (args.kv_cache_gb == 0.0) {  // exactly what the batch needs
      options.kv_pages = batch * ((positions - 1 + args.page_size - 1) / args.page_size);
    }
    const auto prompts = random_prompts(batch, args.prompt_tokens, config.vocab_size, args.seed);
    // Enough new tokens for kProfileSteps decode steps of the whole batch after the steps that
    // take in the prompts (the first sequences decode meanwhile), within --new-tokens.
    GenerateOptions profiled = generation;
    const int prefill_steps = (batch * args.prompt_tokens + args.prefill_chunk - 1) / args.prefill_chunk;
    profiled.max_new_tokens = std::min(args.new_tokens, prefill_steps + kProfileSteps);
    const double profile_context = args.prompt_tokens + profiled.max_new_tokens / 2.0;
    // Before the measured engine is built: one engine per model at a time.
    const OpTimes profile = args.profile ? profile_decode(*model, options, prompts, profiled) : OpTimes{};

    CudaEngine engine(*model, options);
    const MemoryPlan plan = engine.memory_plan();
    fmt::print("batch {}: {}\n", batch, describe(plan));

    // Warm-up: the first steps load kernels and capture the decode graph of this bucket.
    GenerateOptions warm_up = generation;
    warm_up.max_new_tokens = 2;
    (void)engine.generate(prompts, warm_up);
    engine.reset_stats();

    generation.max_new_tokens = args.new_tokens;
    const auto start = Clock::now();
    const std::vector<Generation> out = engine.generate(prompts, generation);
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    for (const Generation& g : out) {
      OSSRL_CHECK(int(g.tokens.size()) == args.new_tokens, "bench: a sequence generated {} tokens, not {}",
                  g.tokens.size(), args.new_tokens);
    }

    const EngineStats& s = engine.stats();
    const double decode_step = s.decode_steps > 0 ? s.decode_seconds / double(s.decode_steps) : 0.0;
    const DecodeTraffic traffic = decode_traffic(config, mxfp4, batch, mean_context);
    const double roofline_step = (traffic.weight_bytes() + traffic.kv_bytes()) / kBandwidth;
    const double roofline_percent = decode_step > 0 ? 100.0 * roofline_step / decode_step : 0.0;
    const double tokens_per_second = double(batch) * args.new_tokens / seconds;
    table.push_back(fmt::format("{:>6} {:>7} {:>5} {:>10.1f} {:>10.2f} {:>9.3f} {:>8.2f} {:>7.3f} {:>7.1f} {:>9.1f} "
                                "{:>9.2f}",
                                batch, args.prompt_tokens, args.new_tokens, tokens_per_second, decode_step * 1e3,
                                s.prefill_seconds, traffic.weight_bytes() / 1e9, traffic.kv_bytes() / 1e9,
                                traffic.distinct_experts, roofline_percent, double(s.peak_gpu_bytes) / kGiB));
    rows.push_back({{"model", args.model},
                    {"experts", args.experts},
                    {"batch", batch},
                    {"prompt_tokens", args.prompt_tokens},
                    {"new_tokens", args.new_tokens},
                    {"seconds", seconds},
                    {"tokens_per_second", tokens_per_second},
                    {"decode_ms_per_step", decode_step * 1e3},
                    {"decode_steps", s.decode_steps},
                    {"graph_replays", s.graph_replays},
                    {"prefill_seconds", s.prefill_seconds},
                    {"prefill_steps", s.prefill_steps},
                    {"weight_bytes_per_step", traffic.weight_bytes()},
                    {"kv_bytes_per_step", traffic.kv_bytes()},
                    {"distinct_experts_per_layer", traffic.distinct_experts},
                    {"roofline_percent", roofline_percent},
                    {"peak_gpu_bytes", s.peak_gpu_bytes},
                    {"plan", {{"weights", plan.weights}, {"kv_cache", plan.kv_cache}, {"workspace", plan.workspace},
                              {"kv_pages", plan.kv_pages}, {"page_size", plan.page_size},
                              {"host_embeddings", plan.host_embeddings}}}});
    if (args.profile) {
      const DecodeTraffic profile_traffic = decode_traffic(config, mxfp4, batch, profile_context);
      profiles.push_back(format_profile(batch, profile, profile_traffic, decode_step * 1e3));
      rows.back()["profile"] = profile_json(profile, profile_traffic);
    }
  }

  fmt::print("\n{:>6} {:>7} {:>5} {:>10} {:>10} {:>9} {:>8} {:>7} {:>7} {:>9} {:>9}\n", "batch", "prompt", "new",
             "tokens/s", "ms/step", "prefill", "GB wts", "GB kv", "experts", "roofline", "peak GiB");
  for (const std::string& line : table) fmt::print("{}\n", line);
  fmt::print(
      "\ntokens/s: batch x new tokens / wall time, prefill included. ms/step: mean decode step. prefill: seconds "
      "in steps holding prompt tokens.\nroofline: (GB wts + GB kv) / {:.1e} B/s as a share of ms/step. GB wts: "
      "attention, router, norms, lm_head, the batch's embedding rows and the distinct experts read per layer, "
      "E (1 - (1 - k/E)^B) for B tokens routed to k of E experts (the experts column). GB kv: K and V of the "
      "mean context ({:.0f} positions; sliding layers at most {}) of every sequence. peak: device memory in use "
      "after a step (all processes).\n",
      kBandwidth, mean_context, config.sliding_window);
  for (const std::string& p : profiles) fmt::print("{}", p);
  if (!profiles.empty()) {
    fmt::print(
        "\nThe ops of a timed step are enqueued behind a hold and then run back to back, so each time is GPU "
        "execution, not launch latency; the event between every two ops adds a few microseconds to each, which "
        "shows at batch 1. MB moved: weights (distinct experts as above), KV of the profiled steps' mean context "
        "and activations, each read or written once.\n");
  }
  if (!args.json_path.empty()) {
    std::ofstream out(args.json_path);
    OSSRL_CHECK(out, "cannot write {}", args.json_path);
    out << rows.dump(2) << '\n';
    OSSRL_CHECK(out, "cannot write {}", args.json_path);
    fmt::print("rows written to {}\n", args.json_path);
  }
}

}  // namespace

Command add_bench(CLI::App& app) {
  auto args = std::make_shared<BenchArgs>();
  CLI::App* bench = app.add_subcommand("bench", "Measure the GPU engine");
  bench->require_subcommand(1);
  CLI::App* command = bench->add_subcommand(
      "generate", "Rollout throughput on random weights of the 20b or 120b shape, against the bandwidth roofline");
  command->add_option("--model", args->model, "Model shape")
      ->capture_default_str()
      ->check(CLI::IsMember({"20b", "120b"}));
  command->add_option("--experts", args->experts, "Expert weights format")
      ->capture_default_str()
      ->check(CLI::IsMember({"mxfp4", "bf16"}));
  command->add_option("--prompt-tokens", args->prompt_tokens, "Tokens per random prompt")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--new-tokens", args->new_tokens, "Tokens generated per sequence")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--batch", args->batches, "Batch sizes, comma separated")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--kv-cache-gb", args->kv_cache_gb, "KV cache size in GiB (0: what each batch needs)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_option("--prefill-chunk", args->prefill_chunk, "Prompt tokens per step")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--page-size", args->page_size, "Positions per KV page")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--temperature", args->temperature, "Sampling temperature")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_flag("!--no-cuda-graphs", args->cuda_graphs, "Run decode steps eagerly, not as CUDA graphs");
  command->add_flag("--profile", args->profile,
                    "Also time each op class of eager decode steps (CUDA events) against the bytes it moves");
  command->add_flag("--offload-embeddings", args->offload_embeddings,
                    "Keep embed_tokens in pinned host memory, read over PCIe (frees its GPU memory)");
  command->add_option("--seed", args->seed, "Seed of the weights, prompts and sampling")->capture_default_str();
  command->add_option("--json", args->json_path, "Also write the rows to this JSON file");
  const Command train = add_bench_train(*bench);
  return [args, command, train] {
    if (command->parsed()) {
      run(*args);
    } else {
      train();
    }
  };
}

}  // namespace ossrl::cli
