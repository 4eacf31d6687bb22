// The KV page allocator: pages handed out lazily within a reservation, whole-page prefix
// sharing with reference counts, release back to the free list, and a full cache refusing a
// sequence with a message that says what to change.
#include <gtest/gtest.h>

#include <vector>

#include "core/error.h"
#include "engine/kv_pages.h"

namespace ossrl {
namespace {

std::vector<int32_t> table(const KvPages& kv, KvPages::SequenceId s) {
  const auto t = kv.block_table(s);
  return {t.begin(), t.end()};
}

TEST(KvPagesTest, GrowsWithinReservationAndMapsPositionsToSlots) {
  KvPages kv(8, 4);
  EXPECT_EQ(kv.pages_for(0), 0);
  EXPECT_EQ(kv.pages_for(4), 1);
  EXPECT_EQ(kv.pages_for(5), 2);
  const auto a = kv.add_sequence(3);
  EXPECT_EQ(kv.free_pages(), 8);
  EXPECT_EQ(kv.available_pages(), 5);  // three promised to a
  kv.grow(a, 5);
  EXPECT_EQ(table(kv, a), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(kv.free_pages(), 6);
  EXPECT_EQ(kv.available_pages(), 5);  // a's pages came out of its own reservation
  kv.grow(a, 3);                       // shrinking is a no-op
  EXPECT_EQ(table(kv, a).size(), 2u);
  EXPECT_EQ(kv.kv_slot(a, 0), 0);
  EXPECT_EQ(kv.kv_slot(a, 4), 4);
  const auto b = kv.add_sequence(2);
  kv.grow(b, 1);
  kv.grow(a, 9);  // a's third page comes after b's first
  EXPECT_EQ(table(kv, a), (std::vector<int32_t>{0, 1, 3}));
  EXPECT_EQ(kv.kv_slot(a, 9), 3 * 4 + 1);
  EXPECT_EQ(kv.kv_slot(b, 2), 2 * 4 + 2);
  EXPECT_THROW(kv.kv_slot(b, 4), Error);  // no page there yet
  EXPECT_THROW(kv.grow(a, 13), Error);    // a fourth page is past a's reservation
}

TEST(KvPagesTest, SharedPrefixPagesAreCountedAndFreedWithTheirLastHolder) {
  KvPages kv(10, 4);
  const auto leader = kv.add_sequence(4);
  kv.grow(leader, 10);  // pages 0, 1 full, page 2 partial
  EXPECT_THROW(kv.share_prefix(leader, 6, 2), Error);   // not a whole number of pages
  EXPECT_THROW(kv.share_prefix(leader, 16, 2), Error);  // more pages than the leader has
  const auto member = kv.share_prefix(leader, 8, 3);
  EXPECT_EQ(table(kv, member), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(kv.refcount(0), 2);
  EXPECT_EQ(kv.refcount(1), 2);
  EXPECT_EQ(kv.refcount(2), 1);
  // The member's own positions start on a fresh page: the leader's partial page 2 is not shared.
  kv.grow(member, 10);
  EXPECT_EQ(table(kv, member), (std::vector<int32_t>{0, 1, 3}));
  EXPECT_EQ(kv.kv_slot(member, 9), 3 * 4 + 1);
  EXPECT_EQ(kv.kv_slot(leader, 9), 2 * 4 + 1);

  const int free_before = kv.free_pages();
  kv.remove_sequence(leader);
  // Page 2 was the leader's alone; 0 and 1 live on in the member.
  EXPECT_EQ(kv.free_pages(), free_before + 1);
  EXPECT_EQ(kv.refcount(0), 1);
  EXPECT_EQ(kv.refcount(2), 0);
  EXPECT_EQ(kv.live_sequences(), 1);
  kv.remove_sequence(member);
  EXPECT_EQ(kv.free_pages(), 10);
  EXPECT_EQ(kv.available_pages(), 10);
  EXPECT_EQ(kv.live_sequences(), 0);
  EXPECT_THROW(kv.block_table(member), Error);  // removed
}

TEST(KvPagesTest, ReleaseReturnsUnusedReservationAndReusesIds) {
  KvPages kv(6, 2);
  const auto a = kv.add_sequence(4);
  kv.grow(a, 3);  // two pages taken, two still promised
  EXPECT_EQ(kv.available_pages(), 2);
  kv.remove_sequence(a);
  EXPECT_EQ(kv.available_pages(), 6);
  EXPECT_EQ(kv.free_pages(), 6);
  const auto b = kv.add_sequence(1);
  EXPECT_EQ(b, a);  // the slot of a removed sequence is reused
  EXPECT_TRUE(kv.block_table(b).empty());
}

TEST(KvPagesTest, FullCacheRefusesWithCountsInTheMessage) {
  KvPages kv(4, 16);
  const auto a = kv.add_sequence(3);
  kv.grow(a, 20);
  try {
    kv.add_sequence(2);
    FAIL() << "expected an out-of-pages error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("out of KV cache pages"), std::string::npos) << message;
    EXPECT_NE(message.find("needs 2 pages of 16 positions, 1 of the cache's 4 are available"), std::string::npos)
        << message;
    EXPECT_NE(message.find("--kv-cache-gb"), std::string::npos) << message;
  }
  // Nothing changed: a one-page sequence still fits.
  EXPECT_EQ(kv.available_pages(), 1);
  const auto b = kv.add_sequence(1);
  kv.grow(b, 16);
  EXPECT_EQ(kv.free_pages(), 1);  // a's third page is promised to it
  EXPECT_EQ(kv.available_pages(), 0);
}

}  // namespace
}  // namespace ossrl
