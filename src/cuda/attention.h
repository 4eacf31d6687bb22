// Causal GQA attention with per-head sinks and sliding windows over a paged KV cache, for a
// ragged batch of queries: one launch serves prefill (many queries of a sequence) and decode
// (one query per sequence) alike. Flash-style: keys are streamed in tiles with an online
// softmax, so memory is O(queries), never O(queries x keys).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

// The most queries one tile holds: the engine cuts each sequence's new tokens into tiles.
constexpr int kAttentionTileQueries = 16;

// Queries [first_query, first_query + count) all belong to sequence `seq`, at consecutive
// positions query_pos[first_query] + j. count may be 0 (a padding tile: nothing is done).
struct QueryTile {
  int32_t first_query = 0;
  int32_t count = 0;
  int32_t seq = 0;
};

struct PagedKv {
  const __nv_bfloat16* k = nullptr;   // [pages * page_size, kv_heads, head_dim] bf16, one layer
  const __nv_bfloat16* v = nullptr;   // same
  const int32_t* block_tables = nullptr;  // [sequences, max_pages_per_seq]: page of position u is
                                          // block_tables[seq * max_pages_per_seq + u / page_size]
  int max_pages_per_seq = 0;
  int page_size = 0;
};

// For each query (position p, sequence seq) and head h, over key positions u of seq with
// u <= p (and p - u < sliding_window when sliding_window > 0), exactly as
// model/cpu/attention.h:
//   s_u = q · k_u / sqrt(head_dim); out = Σ_u exp(s_u - lse) v_u,
//   lse = log(exp(sinks[h]) + Σ_u exp(s_u)); query head h reads kv head h / (heads/kv_heads).
// q [n_queries, heads, head_dim] fp32; out [n_queries, heads, head_dim] bf16; sinks [heads]
// fp32. The keys of every position a query sees must already be in the cache. head_dim 64.
// max_tile_queries: at most that many queries in any tile (1 for a decode step); the smaller,
// the more kv heads of a sequence one CTA can take. It changes only how the work is cut (the
// results agree to rounding); a tile holding more queries is still computed right, slower.
void paged_attention_forward(__nv_bfloat16* out, const float* q, const PagedKv& kv, const float* sinks,
                             const int32_t* query_pos, const QueryTile* tiles, int n_tiles, int heads,
                             int kv_heads, int head_dim, int sliding_window, cudaStream_t stream,
                             int max_tile_queries = kAttentionTileQueries);

}  // namespace ossrl::cuda
