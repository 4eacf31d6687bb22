// `ossrl bench generate`: rollout throughput of the GPU engine on a model of the gpt-oss-20b or
// -120b shape with random weights (no checkpoint needed), for a list of batch sizes, next to
// the memory-bandwidth roofline of its decode steps.
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "cuda/device.h"
#include "engine/cuda_engine.h"

namespace ossrl::cli {

namespace {

constexpr double kGiB = double(1 << 30);
// The HBM bandwidth the roofline assumes: H100 SXM's 3.35 TB/s less what is reachable in practice.
constexpr double kBandwidth = 3.0e12;

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
  uint64_t seed = 0;
  std::string json_path;
};

// The least a decode step of `batch` sequences reads from GPU memory: each weight it uses
// once, and the K and V of every position each sequence attends to.
struct DecodeTraffic {
  double weight_bytes = 0;
  double kv_bytes = 0;
  double distinct_experts = 0;  // per layer
};

DecodeTraffic decode_traffic(const GptOssConfig& c, bool mxfp4, int batch, double context) {
  constexpr double bf16 = 2, f32 = 4;
  const double hidden = c.hidden_size, inter = c.intermediate_size, experts = c.num_local_experts;
  const double q_width = double(c.num_attention_heads) * c.head_dim;
  const double kv_width = double(c.num_key_value_heads) * c.head_dim;
  // q, k, v, o projections in bf16, their biases and the sinks in fp32.
  const double attention = (hidden * (q_width + 2 * kv_width) + q_width * hidden) * bf16 +
                           (q_width + 2 * kv_width + hidden + c.num_attention_heads) * f32;
  const double router = hidden * experts * bf16 + experts * f32;
  const double norms = 2 * hidden * f32;
  // One expert: gate_up [2I, H] and down [H, I]; MXFP4 holds 4 bits a weight and a scale byte
  // per 32 weights; biases fp32.
  const double expert_weights = 3 * inter * hidden;
  const double expert = expert_weights * (mxfp4 ? 0.5 + 1.0 / 32 : bf16) + (2 * inter + hidden) * f32;
  DecodeTraffic t;
  // B tokens each routed to k of E experts, uniformly: an expert is missed by all of them with
  // probability (1 - k/E)^B, so E (1 - (1 - k/E)^B) distinct experts are read per layer.
  t.distinct_experts = experts * (1.0 - std::pow(1.0 - c.experts_per_token / experts, batch));
  t.weight_bytes = c.num_hidden_layers * (attention + router + norms + t.distinct_experts * expert) +
                   double(c.vocab_size) * hidden * bf16  // lm_head, every row
                   + batch * hidden * bf16               // the embedding rows of the batch's tokens
                   + hidden * f32;                       // final norm
  for (AttentionType type : c.layer_types) {
    const double visible = type == AttentionType::Sliding ? std::min(context, double(c.sliding_window)) : context;
    t.kv_bytes += batch * visible * 2 * kv_width * bf16;
  }
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

void run(const BenchArgs& args) {
  using Clock = std::chrono::steady_clock;
  OSSRL_CHECK(cuda::device_count() > 0, "bench generate: no GPU on this machine");
  const GptOssConfig config = args.model == "120b" ? GptOssConfig::gpt_oss_120b() : GptOssConfig::gpt_oss_20b();
  const bool mxfp4 = args.experts == "mxfp4";
  fmt::print("{}\n", cuda::device_summary(0));
  const auto load_start = Clock::now();
  const auto model = CudaModel::random(config, mxfp4, args.seed);
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
  std::vector<std::string> table;
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
    CudaEngine engine(*model, options);
    const MemoryPlan plan = engine.memory_plan();
    fmt::print("batch {}: {}\n", batch, describe(plan));

    const auto prompts = random_prompts(batch, args.prompt_tokens, config.vocab_size, args.seed);
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
    const double roofline_step = (traffic.weight_bytes + traffic.kv_bytes) / kBandwidth;
    const double roofline_percent = decode_step > 0 ? 100.0 * roofline_step / decode_step : 0.0;
    const double tokens_per_second = double(batch) * args.new_tokens / seconds;
    table.push_back(fmt::format("{:>6} {:>7} {:>5} {:>10.1f} {:>10.2f} {:>9.3f} {:>8.2f} {:>7.3f} {:>7.1f} {:>9.1f} "
                                "{:>9.2f}",
                                batch, args.prompt_tokens, args.new_tokens, tokens_per_second, decode_step * 1e3,
                                s.prefill_seconds, traffic.weight_bytes / 1e9, traffic.kv_bytes / 1e9,
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
                    {"weight_bytes_per_step", traffic.weight_bytes},
                    {"kv_bytes_per_step", traffic.kv_bytes},
                    {"distinct_experts_per_layer", traffic.distinct_experts},
                    {"roofline_percent", roofline_percent},
                    {"peak_gpu_bytes", s.peak_gpu_bytes},
                    {"plan", {{"weights", plan.weights}, {"kv_cache", plan.kv_cache}, {"workspace", plan.workspace},
                              {"kv_pages", plan.kv_pages}, {"page_size", plan.page_size}}}});
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
  command->add_option("--seed", args->seed, "Seed of the weights, prompts and sampling")->capture_default_str();
  command->add_option("--json", args->json_path, "Also write the rows to this JSON file");
  return [args] { run(*args); };
}

}  // namespace ossrl::cli
