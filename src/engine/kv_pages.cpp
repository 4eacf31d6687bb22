#include "engine/kv_pages.h"

#include "core/error.h"

namespace ossrl {

KvPages::KvPages(int num_pages, int page_size) : page_size_(page_size), refcounts_(size_t(num_pages), 0) {
  OSSRL_CHECK(num_pages > 0 && page_size > 0, "KV cache: need pages > 0 and page size > 0 (got {} and {})",
              num_pages, page_size);
  free_.reserve(size_t(num_pages));
  // Reversed so that page 0 is handed out first: block tables read in order in tests and logs.
  for (int p = num_pages - 1; p >= 0; --p) free_.push_back(p);
}

KvPages::Sequence& KvPages::live(SequenceId id) {
  OSSRL_CHECK(id >= 0 && size_t(id) < sequences_.size() && sequences_[size_t(id)].live,
              "KV cache: no live sequence {}", id);
  return sequences_[size_t(id)];
}

const KvPages::Sequence& KvPages::live(SequenceId id) const { return const_cast<KvPages*>(this)->live(id); }

KvPages::SequenceId KvPages::new_id(int reserve) {
  OSSRL_CHECK(reserve >= 0, "KV cache: negative reservation {}", reserve);
  OSSRL_CHECK(reserve <= available_pages(),
              "out of KV cache pages: a sequence needs {} pages of {} positions, {} of the cache's {} are "
              "available ({} free, {} promised to running sequences); raise --kv-cache-gb or lower "
              "--max-new-tokens or --max-batch",
              reserve, page_size_, available_pages(), num_pages(), free_pages(), promised_);
  SequenceId id;
  if (free_ids_.empty()) {
    id = SequenceId(sequences_.size());
    sequences_.emplace_back();
  } else {
    id = free_ids_.back();
    free_ids_.pop_back();
  }
  Sequence& s = sequences_[size_t(id)];
  s.pages.clear();
  s.reserve_left = reserve;
  s.live = true;
  promised_ += reserve;
  return id;
}

KvPages::SequenceId KvPages::add_sequence(int reserve) { return new_id(reserve); }

KvPages::SequenceId KvPages::share_prefix(SequenceId source, int positions, int reserve) {
  OSSRL_CHECK(positions >= 0 && positions % page_size_ == 0,
              "KV cache: only whole pages are shared ({} positions, page size {})", positions, page_size_);
  const size_t shared = size_t(positions / page_size_);
  OSSRL_CHECK(shared <= live(source).pages.size(), "KV cache: sequence {} holds {} pages, cannot share {}",
              source, live(source).pages.size(), shared);
  const SequenceId id = new_id(reserve);
  // new_id may grow sequences_: look the source up again.
  const std::vector<int32_t>& source_pages = live(source).pages;
  Sequence& s = sequences_[size_t(id)];
  s.pages.assign(source_pages.begin(), source_pages.begin() + std::ptrdiff_t(shared));
  for (int32_t page : s.pages) ++refcounts_[size_t(page)];
  return id;
}

void KvPages::grow(SequenceId sequence, int length) {
  Sequence& s = live(sequence);
  const size_t want = size_t(pages_for(length));
  if (want <= s.pages.size()) return;
  const int more = int(want - s.pages.size());
  OSSRL_CHECK(more <= s.reserve_left,
              "KV cache: sequence {} grows to {} positions ({} pages) past its reservation ({} pages more)",
              sequence, length, want, s.reserve_left);
  for (int i = 0; i < more; ++i) {
    const int32_t page = free_.back();
    free_.pop_back();
    refcounts_[size_t(page)] = 1;
    s.pages.push_back(page);
  }
  s.reserve_left -= more;
  promised_ -= more;
}

void KvPages::remove_sequence(SequenceId sequence) {
  Sequence& s = live(sequence);
  for (int32_t page : s.pages) {
    if (--refcounts_[size_t(page)] == 0) free_.push_back(page);
  }
  promised_ -= s.reserve_left;
  s.pages.clear();
  s.reserve_left = 0;
  s.live = false;
  free_ids_.push_back(sequence);
}

std::span<const int32_t> KvPages::block_table(SequenceId sequence) const { return live(sequence).pages; }

int32_t KvPages::kv_slot(SequenceId sequence, int position) const {
  const Sequence& s = live(sequence);
  const size_t index = size_t(position / page_size_);
  OSSRL_CHECK(position >= 0 && index < s.pages.size(), "KV cache: position {} of sequence {} has no page",
              position, sequence);
  return s.pages[index] * page_size_ + position % page_size_;
}

}  // namespace ossrl
