// Times paged_attention_forward (cuda/attention.h) at gpt-oss-20b's attention shape (64 query
// heads, 8 kv heads, head_dim 64, pages of 16 positions) for its two layer kinds (full causal
// and window 128): decode steps (one query per sequence after `context - 1` cached positions)
// from batch 1 at 16k to batch 256, and a prefill of whole prompts (tiles of 16 queries). Per
// call: µs, and the K/V bytes of the cache the call reads (each position a query sees, once per
// sequence and kv head) over the time, against the H100's ~3.0 TB/s. As in the engine, where
// every layer has its own cache, consecutive calls cycle through copies of the pages they read
// (block tables over disjoint pages), enough that a copy's pages have left the 50 MB L2 before
// it is read again; calls run back to back on one stream.
// Usage: attention_bench [iterations]   (default 50)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/attention.h"
#include "cuda/buffer.h"
#include "cuda/check.h"
#include "gpu_bench.h"
#include "random_inputs.h"

namespace ossrl {
namespace {

constexpr int kHeads = 64, kKvHeads = 8, kHeadDim = 64, kPageSize = 16;
constexpr double kPeakBytesPerSecond = 3.0e12;
// Bytes the other copies read between two reads of one copy: twice the L2.
constexpr double kEvictBytes = 100e6;
constexpr int64_t kPositionBytes = int64_t(2) * kKvHeads * kHeadDim * 2;  // K and V of a position, bf16

// The buffer filled with copies of `chunk` (random values: the time does not depend on them, they
// only have to be finite), so that a prefill's 1 GB of q is not drawn value by value.
constexpr size_t kChunk = size_t(1) << 22;
template <class T>
void fill_random(cuda::DeviceBuffer<T>& buffer, const std::vector<T>& chunk) {
  for (size_t at = 0; at < buffer.size(); at += chunk.size()) {
    const size_t n = std::min(chunk.size(), buffer.size() - at);
    OSSRL_CUDA_CHECK(cudaMemcpy(buffer.data() + at, chunk.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
}

struct BenchCase {
  const char* kind;
  int seqs;
  int context;  // positions per sequence after the call, the queries' included
  int queries;  // new positions per sequence: 1 (decode) or `context` (prefill)
  int window;
};

void bench(const BenchCase& c, int iterations) {
  std::mt19937 rng(1);
  const int cached = c.context - c.queries;
  // The key positions a sequence's queries see: [first_key, context).
  const int first_key = c.window > 0 ? std::max(0, cached - c.window + 1) : 0;
  const int first_page = first_key / kPageSize;
  const int pages_per_seq = (c.context + kPageSize - 1) / kPageSize;
  const int touched_pages = pages_per_seq - first_page;
  const double bytes = double(c.seqs) * (c.context - first_key) * kPositionBytes;
  const int copies = 1 + std::max(1, int(kEvictBytes / bytes + 0.999));

  // Copy j's sequence s reads pages (j * seqs + s) * touched_pages + i; the pages it never
  // reads (before the window) point at page 0.
  std::vector<int32_t> block_tables(size_t(copies) * c.seqs * pages_per_seq, 0);
  for (int j = 0; j < copies; ++j) {
    for (int s = 0; s < c.seqs; ++s) {
      for (int p = first_page; p < pages_per_seq; ++p) {
        block_tables[(size_t(j) * c.seqs + s) * pages_per_seq + p] =
            int32_t((int64_t(j) * c.seqs + s) * touched_pages + p - first_page);
      }
    }
  }
  const int64_t pool_pages = int64_t(copies) * c.seqs * touched_pages;
  const int64_t pool_elements = pool_pages * kPageSize * kKvHeads * kHeadDim;
  cuda::DeviceBuffer<uint16_t> k(size_t(pool_elements), "k pool"), v(size_t(pool_elements), "v pool");
  fill_random(k, test::uniform_bf16_bits(kChunk, 1.0f, rng));
  fill_random(v, test::uniform_bf16_bits(kChunk, 1.0f, rng));

  std::vector<int32_t> positions;
  std::vector<cuda::QueryTile> tiles;
  for (int s = 0; s < c.seqs; ++s) {
    const int first = int(positions.size());
    for (int t = 0; t < c.queries; t += cuda::kAttentionTileQueries) {
      tiles.push_back({first + t, std::min(cuda::kAttentionTileQueries, c.queries - t), s});
    }
    for (int t = 0; t < c.queries; ++t) positions.push_back(cached + t);
  }
  const size_t n_queries = positions.size();
  cuda::DeviceBuffer<float> q(n_queries * kHeads * kHeadDim, "q");
  fill_random(q, test::uniform_vector(kChunk, 4.0f, rng));
  const cuda::DeviceBuffer<float> sinks(test::uniform_vector(kHeads, 2.0f, rng), "sinks");
  const cuda::DeviceBuffer<int32_t> tables_d(block_tables, "block tables"), positions_d(positions, "positions");
  const cuda::DeviceBuffer<cuda::QueryTile> tiles_d(tiles, "tiles");
  cuda::DeviceBuffer<uint16_t> out(n_queries * kHeads * kHeadDim, "out");

  auto call = [&](int copy, int max_tile_queries) {
    cuda::PagedKv kv;
    kv.k = reinterpret_cast<const __nv_bfloat16*>(k.data());
    kv.v = reinterpret_cast<const __nv_bfloat16*>(v.data());
    kv.block_tables = tables_d.data() + size_t(copy) * c.seqs * pages_per_seq;
    kv.max_pages_per_seq = pages_per_seq;
    kv.page_size = kPageSize;
    cuda::paged_attention_forward(reinterpret_cast<__nv_bfloat16*>(out.data()), q.data(), kv, sinks.data(),
                                  positions_d.data(), tiles_d.data(), int(tiles.size()), kHeads, kKvHeads, kHeadDim,
                                  c.window, nullptr, max_tile_queries);
  };
  // Decode steps are timed as a caller may launch them: saying nothing of the tiles (up to 16
  // queries each), and saying that every tile holds one query.
  std::vector<int> max_tile_queries_values{cuda::kAttentionTileQueries};
  if (c.queries < cuda::kAttentionTileQueries) max_tile_queries_values.push_back(c.queries);
  for (const int max_tile_queries : max_tile_queries_values) {
    for (int j = 0; j < copies; ++j) call(j, max_tile_queries);  // warm-up: module load, first touch
    test::EventTimer timer;
    const double seconds = 1e-3 * timer.ms([&] {
      for (int i = 0; i < iterations; ++i) call(i % copies, max_tile_queries);
    }) / iterations;
    OSSRL_CUDA_CHECK(cudaDeviceSynchronize());
    std::printf("%-8s %5d %8d %7d %6d | %6zu %7d | %9.1f %8.2f %6.1f%%\n", c.kind, c.seqs, c.context, c.window,
                max_tile_queries, tiles.size(), copies, seconds * 1e6, bytes / seconds / 1e12,
                100.0 * bytes / seconds / kPeakBytesPerSecond);
  }
}

}  // namespace
}  // namespace ossrl

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::max(1, std::atoi(argv[1])) : 50;
  return ossrl::test::bench_main("attention_bench", [&] {
    std::printf("heads %d / kv heads %d, head_dim %d, page %d; mean of %d calls\n", ossrl::kHeads, ossrl::kKvHeads,
                ossrl::kHeadDim, ossrl::kPageSize, iterations);
    std::printf("%-8s %5s %8s %7s %6s | %6s %7s | %9s %8s %7s\n", "kind", "seqs", "context", "window", "max_q",
                "tiles", "copies", "us", "KV TB/s", "%3TB/s");
    for (const int window : {0, 128}) {
      for (const ossrl::BenchCase c : {ossrl::BenchCase{"decode", 1, 16384, 1, window},
                                       ossrl::BenchCase{"decode", 64, 512, 1, window},
                                       ossrl::BenchCase{"decode", 64, 1024, 1, window},
                                       ossrl::BenchCase{"decode", 256, 256, 1, window},
                                       ossrl::BenchCase{"decode", 256, 512, 1, window},
                                       ossrl::BenchCase{"prefill", 256, 256, 256, window}}) {
        ossrl::bench(c, iterations);
      }
    }
  });
}
