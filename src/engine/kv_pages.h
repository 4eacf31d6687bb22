// The paged KV cache's bookkeeping, on the host: which pages are free, which pages hold each
// sequence's positions (its block table), and how many sequences share each page. The GPU
// side (engine/cuda_model.h) only sees the resulting block tables and kv slots.
//
// Sharing is by whole pages only: the completions of one prompt share the pages the prompt
// fills completely, and each writes its own positions from the first unshared page on. A
// shared page is therefore never written again, and no page needs copying on write.
//
// Each sequence is admitted with a reservation: the most pages it will ever own. Pages are
// handed out lazily as it grows, but admission checks the reservation against what is free
// and not yet promised, so a running sequence never finds the cache full.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace ossrl {

class KvPages {
 public:
  using SequenceId = int;

  KvPages(int num_pages, int page_size);

  int page_size() const { return page_size_; }
  int num_pages() const { return int(refcounts_.size()); }
  // Pages on the free list.
  int free_pages() const { return int(free_.size()); }
  // Free pages not promised to a running sequence's reservation: what admission may take.
  int available_pages() const { return free_pages() - promised_; }
  // Pages that hold `positions` positions.
  int pages_for(int64_t positions) const { return int((positions + page_size_ - 1) / page_size_); }

  // A new sequence with no positions that may own up to `reserve` pages of its own.
  // Throws an Error naming the counts when fewer than `reserve` pages are available.
  SequenceId add_sequence(int reserve);
  // A new sequence whose positions [0, positions) are `source`'s pages, shared (each gains a
  // reference), plus a reservation of `reserve` pages of its own for what follows.
  // `positions` must be a multiple of page_size and already have pages in `source`.
  SequenceId share_prefix(SequenceId source, int positions, int reserve);
  // Gives the sequence pages for positions [0, length), drawing on its reservation.
  void grow(SequenceId sequence, int length);
  // Drops the sequence's references (a page with none left returns to the free list) and the
  // unused part of its reservation.
  void remove_sequence(SequenceId sequence);

  // The sequence's pages in position order: position p is in page block_table[p / page_size].
  std::span<const int32_t> block_table(SequenceId sequence) const;
  // Where position p of the sequence lives in the cache: page * page_size + p % page_size.
  int32_t kv_slot(SequenceId sequence, int position) const;
  int refcount(int32_t page) const { return refcounts_[size_t(page)]; }
  int live_sequences() const { return int(sequences_.size() - free_ids_.size()); }

 private:
  struct Sequence {
    std::vector<int32_t> pages;
    int reserve_left = 0;  // pages it may still take from the free list
    bool live = false;
  };
  Sequence& live(SequenceId id);
  const Sequence& live(SequenceId id) const;
  SequenceId new_id(int reserve);

  int page_size_;
  std::vector<int> refcounts_;  // [num_pages]
  std::vector<int32_t> free_;   // a stack: the most recently freed page is reused first
  int promised_ = 0;            // Σ reserve_left over live sequences
  std::vector<Sequence> sequences_;
  std::vector<SequenceId> free_ids_;
};

}  // namespace ossrl
