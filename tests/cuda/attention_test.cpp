// paged_attention_forward against the CPU oracle (model/cpu/attention.h), sequence by sequence,
// over a paged cache whose pages are handed out in shuffled order.
#include "cuda/attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda/gpu_test.h"
#include "model/cpu/attention.h"

namespace ossrl {
namespace {

constexpr int kHeadDim = 64;
// bf16 bits of a quiet NaN: fills every cache slot no sequence owns, so a read of a wrong
// slot or page poisons the output instead of passing unnoticed.
constexpr uint16_t kNanBits = 0x7fc0;
// Written into out before the launch: a row that still holds it was never written.
constexpr uint16_t kSentinelBits = 0x4640;  // 12288.0

// A sequence whose positions [0, cached) are already in the cache and whose queries sit at
// positions [cached, cached + queries) (their keys are in the cache too, as after rope_qkv).
struct SequenceSpec {
  int cached = 0;
  int queries = 0;
};

struct AttentionCase {
  std::string name;
  int heads = 0;
  int kv_heads = 0;
  int sliding_window = 0;
  int page_size = 0;
  std::vector<SequenceSpec> sequences;
  bool via_graph = false;  // launch inside a captured CUDA graph
  // What the launch is told of the tiles (paged_attention_forward's max_tile_queries).
  int max_tile_queries = cuda::kAttentionTileQueries;
};

void run_case(const AttentionCase& c) {
  SCOPED_TRACE(c.name);
  std::mt19937 rng(1234);
  const int n_seqs = int(c.sequences.size());
  const int64_t kv_row = int64_t(c.kv_heads) * kHeadDim;
  const int64_t q_row = int64_t(c.heads) * kHeadDim;

  // Pages: each sequence takes ceil(length / page_size) of a shuffled pool; two spare pages
  // stay NaN, and unused block-table entries point at one of them.
  std::vector<int> lengths(n_seqs), pages_of(n_seqs);
  int total_pages = 2, max_pages = 1;
  for (int s = 0; s < n_seqs; ++s) {
    lengths[s] = c.sequences[s].cached + c.sequences[s].queries;
    pages_of[s] = (lengths[s] + c.page_size - 1) / c.page_size;
    total_pages += pages_of[s];
    max_pages = std::max(max_pages, pages_of[s]);
  }
  std::vector<int32_t> pool(total_pages);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  const int32_t nan_page = pool.back();
  std::vector<int32_t> block_tables(size_t(n_seqs) * max_pages, nan_page);
  int next_page = 0;
  for (int s = 0; s < n_seqs; ++s) {
    for (int i = 0; i < pages_of[s]; ++i) block_tables[size_t(s) * max_pages + i] = pool[next_page++];
  }

  // Keys and values per sequence, bf16-rounded so the CPU sees what the cache holds.
  const int64_t slots = int64_t(total_pages) * c.page_size;
  std::vector<uint16_t> k_cache(size_t(slots * kv_row), kNanBits), v_cache(k_cache);
  std::vector<std::vector<float>> k_seq(n_seqs), v_seq(n_seqs);
  for (int s = 0; s < n_seqs; ++s) {
    k_seq[s] = test::round_bf16(test::uniform_vector(size_t(lengths[s] * kv_row), 1.0f, rng));
    v_seq[s] = test::round_bf16(test::uniform_vector(size_t(lengths[s] * kv_row), 1.0f, rng));
    for (int u = 0; u < lengths[s]; ++u) {
      const int64_t slot = int64_t(block_tables[size_t(s) * max_pages + u / c.page_size]) * c.page_size +
                           u % c.page_size;
      for (int64_t i = 0; i < kv_row; ++i) {
        k_cache[size_t(slot * kv_row + i)] = f32_to_bf16(k_seq[s][size_t(u * kv_row + i)]);
        v_cache[size_t(slot * kv_row + i)] = f32_to_bf16(v_seq[s][size_t(u * kv_row + i)]);
      }
    }
  }

  // Queries of all sequences back to back, cut into tiles of at most kAttentionTileQueries,
  // plus one padding tile (count 0) pointing at an extra query row that must stay untouched.
  std::vector<int64_t> first_query(n_seqs);
  std::vector<int32_t> query_pos;
  std::vector<cuda::QueryTile> tiles;
  for (int s = 0; s < n_seqs; ++s) {
    first_query[s] = int64_t(query_pos.size());
    for (int t = 0; t < c.sequences[s].queries; t += cuda::kAttentionTileQueries) {
      tiles.push_back({int32_t(query_pos.size()) + t,
                       std::min(cuda::kAttentionTileQueries, c.sequences[s].queries - t), s});
    }
    for (int t = 0; t < c.sequences[s].queries; ++t) query_pos.push_back(c.sequences[s].cached + t);
  }
  const int64_t n_queries = int64_t(query_pos.size());
  tiles.insert(tiles.begin() + int64_t(tiles.size() / 2), cuda::QueryTile{int32_t(n_queries), 0, 0});
  query_pos.push_back(0);
  // Logits q·k/8 with |q| < 4, |k| < 1: standard deviation ~1.3, softmaxes neither flat nor one-hot.
  const std::vector<float> q = test::uniform_vector(size_t((n_queries + 1) * q_row), 4.0f, rng);
  const std::vector<float> sinks = test::uniform_vector(size_t(c.heads), 2.0f, rng);

  cuda::DeviceBuffer<float> q_d(q), sinks_d(sinks);
  cuda::DeviceBuffer<uint16_t> k_d(k_cache), v_d(v_cache);
  cuda::DeviceBuffer<int32_t> tables_d(block_tables), pos_d(query_pos);
  cuda::DeviceBuffer<cuda::QueryTile> tiles_d(tiles);
  cuda::DeviceBuffer<uint16_t> out_d(std::vector<uint16_t>(size_t((n_queries + 1) * q_row), kSentinelBits));
  cuda::PagedKv kv;
  kv.k = reinterpret_cast<const __nv_bfloat16*>(k_d.data());
  kv.v = reinterpret_cast<const __nv_bfloat16*>(v_d.data());
  kv.block_tables = tables_d.data();
  kv.max_pages_per_seq = max_pages;
  kv.page_size = c.page_size;
  auto launch = [&](cudaStream_t stream) {
    cuda::paged_attention_forward(reinterpret_cast<__nv_bfloat16*>(out_d.data()), q_d.data(), kv,
                                  sinks_d.data(), pos_d.data(), tiles_d.data(), int(tiles.size()), c.heads,
                                  c.kv_heads, kHeadDim, c.sliding_window, stream, c.max_tile_queries);
  };
  if (c.via_graph) {
    cudaStream_t stream;
    OSSRL_CUDA_CHECK(cudaStreamCreate(&stream));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    OSSRL_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    launch(stream);
    OSSRL_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    OSSRL_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    OSSRL_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    OSSRL_CUDA_CHECK(cudaStreamSynchronize(stream));
    OSSRL_CUDA_CHECK(cudaGraphExecDestroy(exec));
    OSSRL_CUDA_CHECK(cudaGraphDestroy(graph));
    OSSRL_CUDA_CHECK(cudaStreamDestroy(stream));
  } else {
    launch(nullptr);
  }
  OSSRL_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<uint16_t> out_bits = out_d.download();

  for (int64_t i = n_queries * q_row; i < (n_queries + 1) * q_row; ++i) {
    ASSERT_EQ(out_bits[size_t(i)], kSentinelBits) << "the padding tile wrote out[" << n_queries << "]";
  }

  // Tolerance: out is rounded to bf16 (2^-9 relative, at most 2^-9 of max |out|); the kernel
  // rounds the probabilities to bf16 for the P V product (2^-9 relative each, so at most
  // ~2^-9 max |v| in all) and q to bf16 hi + lo (~2^-17); the fp32 online softmax differs from
  // the CPU's two-pass one by ~1e-6. 1e-2 of max |out| leaves room for these, while a key
  // dropped or added by a mask is off by ~1/window or more.
  double max_ref = 0.0, max_err = -1.0;
  int64_t worst = -1;
  int worst_seq = -1;
  std::vector<float> expected(size_t(n_queries * q_row));
  for (int s = 0; s < n_seqs && !std::isinf(max_err); ++s) {
    AttentionDims d;
    d.n_queries = c.sequences[s].queries;
    d.first_query_position = c.sequences[s].cached;
    d.n_keys = lengths[s];
    d.first_key_position = 0;
    d.heads = c.heads;
    d.kv_heads = c.kv_heads;
    d.head_dim = kHeadDim;
    d.sliding_window = c.sliding_window;
    attention_forward(expected.data() + first_query[s] * q_row, nullptr, q.data() + first_query[s] * q_row,
                      k_seq[s].data(), v_seq[s].data(), sinks.data(), d);
    for (int64_t i = first_query[s] * q_row; i < (first_query[s] + d.n_queries) * q_row; ++i) {
      const double err = std::abs(double(bf16_to_f32(out_bits[size_t(i)])) - double(expected[size_t(i)]));
      max_ref = std::max(max_ref, double(std::abs(expected[size_t(i)])));
      if (std::isnan(err) || err > max_err) {
        max_err = std::isnan(err) ? INFINITY : err;  // a NaN is reported as it is found
        worst = i;
        worst_seq = s;
        if (std::isinf(max_err)) break;
      }
    }
  }
  ASSERT_GE(worst, 0);
  const int64_t query = worst / q_row;
  const int64_t query_in_seq = query - first_query[size_t(worst_seq)];
  EXPECT_LE(max_err, 1e-2 * max_ref)
      << "max |gpu - cpu| " << max_err << " (max |cpu| " << max_ref << ") at sequence " << worst_seq
      << " (cached " << c.sequences[size_t(worst_seq)].cached << ", queries "
      << c.sequences[size_t(worst_seq)].queries << "), query " << query_in_seq << " (position "
      << query_pos[size_t(query)] << "), head " << (worst % q_row) / kHeadDim << ", dim " << worst % kHeadDim
      << ": gpu " << bf16_to_f32(out_bits[size_t(worst)]) << ", cpu " << expected[size_t(worst)];
}

// The head layouts: gpt-oss-20b's 64/8, and smaller groups of 4 and 8 on one or two kv heads.
struct HeadLayout {
  int heads, kv_heads;
};
constexpr HeadLayout kLayouts[] = {{64, 8}, {8, 2}, {8, 1}};
constexpr int kWindows[] = {0, 128, 8};

std::string case_name(const char* what, HeadLayout layout, int window, int page_size) {
  return std::string(what) + " heads " + std::to_string(layout.heads) + "/" + std::to_string(layout.kv_heads) +
         " window " + std::to_string(window) + " page " + std::to_string(page_size);
}

// Decode batches as the engine launches them (every tile one query: a CTA takes several kv
// heads of a sequence) and as a launch told nothing of the tiles.
constexpr int kDecodeTileQueries[] = {1, cuda::kAttentionTileQueries};

// Whole prompts from an empty cache: lengths around the 128 window and a tile's 16.
TEST(PagedAttention, PrefillFromEmptyCache) {
  OSSRL_REQUIRE_GPU();
  int variant = 0;
  for (const HeadLayout layout : kLayouts) {
    for (const int window : kWindows) {
      const int page_size = variant++ % 2 == 0 ? 16 : 32;
      run_case({case_name("prefill", layout, window, page_size), layout.heads, layout.kv_heads, window, page_size,
                {{0, 1}, {0, 127}, {0, 128}, {0, 129}, {0, 1000}}});
    }
  }
}

// A chunk of new queries after a cached prefix (chunked prefill, or a turn appended). Tile
// sizes 5, 9, 11, 13 give 3, 5, 6, 7 row tiles of 16 at 8 heads per kv head (warps idle).
TEST(PagedAttention, ChunkAfterCachedPrefix) {
  OSSRL_REQUIRE_GPU();
  int variant = 0;
  for (const HeadLayout layout : kLayouts) {
    for (const int window : kWindows) {
      const int page_size = variant++ % 2 == 0 ? 32 : 16;
      run_case({case_name("chunk", layout, window, page_size), layout.heads, layout.kv_heads, window, page_size,
                {{300, 129}, {1000, 16}, {5, 127}, {127, 1}, {128, 128}, {7, 3}, {250, 1000}, {40, 5}, {60, 9},
                 {33, 11}, {2, 13}}});
    }
  }
}

// Decode: one query per sequence, a batch of 64 with lengths spread over 1..1000 (keys split
// over clusters of CTAs).
TEST(PagedAttention, DecodeMixedLengths) {
  OSSRL_REQUIRE_GPU();
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> length(1, 1000);
  std::vector<SequenceSpec> batch{{0, 1}, {999, 1}, {127, 1}, {128, 1}};
  while (batch.size() < 64) batch.push_back({length(rng) - 1, 1});
  int variant = 0;
  for (const int max_tile_queries : kDecodeTileQueries) {
    for (const HeadLayout layout : kLayouts) {
      for (const int window : kWindows) {
        const int page_size = variant++ % 2 == 0 ? 16 : 32;
        run_case({case_name("decode", layout, window, page_size) + " max_tile_queries " +
                      std::to_string(max_tile_queries),
                  layout.heads, layout.kv_heads, window, page_size, batch, false, max_tile_queries});
      }
    }
  }
}

// The rollout's decode batch: 256 sequences at 256..512 positions, one CTA per sequence (no
// key split) when every tile is said to hold one query.
TEST(PagedAttention, DecodeBatch256) {
  OSSRL_REQUIRE_GPU();
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> cached(255, 511);
  std::vector<SequenceSpec> batch;
  while (batch.size() < 256) batch.push_back({cached(rng), 1});
  for (const int max_tile_queries : kDecodeTileQueries) {
    for (const int window : kWindows) {
      run_case({case_name("decode 256", kLayouts[0], window, 16) + " max_tile_queries " +
                    std::to_string(max_tile_queries),
                kLayouts[0].heads, kLayouts[0].kv_heads, window, 16, batch, false, max_tile_queries});
    }
  }
}

// A launch told that tiles hold one query, given tiles of up to 16: CTAs that took several kv
// heads go through them a few at a time, and the result is still exact.
TEST(PagedAttention, TilesLargerThanSaid) {
  OSSRL_REQUIRE_GPU();
  std::vector<SequenceSpec> batch{{300, 129}, {5, 127}, {127, 1}, {7, 3}, {40, 5}, {60, 9}, {33, 11}, {2, 13}};
  for (int i = 0; i < 40; ++i) batch.push_back({200 + 7 * i, 1});  // enough tiles for whole-sequence CTAs
  int variant = 0;
  for (const HeadLayout layout : kLayouts) {
    for (const int window : kWindows) {
      const int page_size = variant++ % 2 == 0 ? 16 : 32;
      run_case({case_name("larger tiles", layout, window, page_size), layout.heads, layout.kv_heads, window,
                page_size, batch, false, 1});
    }
  }
}

// Few sequences leave most SMs idle, so the keys are split over a cluster of CTAs and merged:
// long contexts (16k+) at batch 1 and 3, decode and a short chunk.
TEST(PagedAttention, LongContextFewSequences) {
  OSSRL_REQUIRE_GPU();
  for (const int window : {0, 128}) {
    for (const int max_tile_queries : kDecodeTileQueries) {
      run_case({case_name("long batch 1", kLayouts[0], window, 32) + " max_tile_queries " +
                    std::to_string(max_tile_queries),
                64, 8, window, 32, {{16999, 1}}, false, max_tile_queries});
    }
    run_case({case_name("long batch 3", kLayouts[0], window, 16), 64, 8, window, 16,
              {{16500, 1}, {0, 1}, {4000, 20}}});
  }
}

// The engine replays decode steps as CUDA graphs: the launch must capture (no sync, no alloc).
TEST(PagedAttention, CapturesIntoGraph) {
  OSSRL_REQUIRE_GPU();
  run_case({"graph", 64, 8, 128, 16, {{200, 1}, {3000, 1}, {0, 17}}, true});
  std::vector<SequenceSpec> decode;
  for (int i = 0; i < 64; ++i) decode.push_back({100 + 13 * i, 1});
  run_case({"graph decode", 64, 8, 0, 16, decode, true, 1});
}

TEST(PagedAttention, RejectsHeadDimOtherThan64) {
  OSSRL_REQUIRE_GPU();
  cuda::PagedKv kv;
  kv.page_size = 16;
  EXPECT_THROW(cuda::paged_attention_forward(nullptr, nullptr, kv, nullptr, nullptr, nullptr, 1, 64, 8, 128, 0,
                                             nullptr),
               Error);
}

}  // namespace
}  // namespace ossrl
