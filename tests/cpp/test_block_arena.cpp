// BlockArena from C++: regions grow to the largest registration and never shrink, ids are unique,
// growing the saved region forgets its writer, and BlockMemory takes from the arena only what it
// shares.
#include <gtest/gtest.h>

#include "cudablocks/block_arena.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {
namespace {

using Region = BlockArena::Region;

TEST(BlockArena, RegionsGrowToTheLargestNeed) {
  BlockArena arena{Device()};
  EXPECT_EQ(arena.nbytes(), 0);
  const std::uint64_t a = arena.register_block({1000, 0, 4000});
  const std::uint64_t b = arena.register_block({500, 256, 8000});
  EXPECT_NE(a, 0u);
  EXPECT_NE(a, b);
  EXPECT_EQ(arena.region_bytes(Region::Scratch), 1000);
  EXPECT_EQ(arena.region_bytes(Region::ScratchBf16), 256);
  EXPECT_EQ(arena.region_bytes(Region::Saved), 8000);
  EXPECT_EQ(arena.nbytes(), 9256);
  EXPECT_THROW(arena.register_block({-1, 0, 0}), InvalidArgumentError);
  EXPECT_EQ(arena.nbytes(), 9256);
}

TEST(BlockArena, GrowingTheSavedRegionForgetsItsWriter) {
  BlockArena arena{Device()};
  const std::uint64_t id = arena.register_block({0, 0, 64});
  {
    BlockArena::Lease lease(arena);
    lease.set_saved_writer(id, {3, 4});
    EXPECT_TRUE(lease.saved_holds(id, {3, 4}));
    EXPECT_FALSE(lease.saved_holds(id, {7}));
    EXPECT_FALSE(lease.saved_holds(id + 1, {3, 4}));
  }
  arena.register_block({128, 0, 64});  // scratch grows, saved does not
  EXPECT_TRUE(BlockArena::Lease(arena).saved_holds(id, {3, 4}));
  arena.register_block({0, 0, 65});
  EXPECT_FALSE(BlockArena::Lease(arena).saved_holds(id, {3, 4}));
}

TEST(BlockMemory, TakesFromTheArenaWhatItShares) {
  const ActivationNeeds needs{1024, 512, 2048};
  EXPECT_EQ(BlockMemory(Device(), needs, nullptr, false).owned_bytes(), 3584);
  auto arena = std::make_shared<BlockArena>(Device());
  BlockMemory scratch_only(Device(), needs, arena, false);
  EXPECT_EQ(scratch_only.owned_bytes(), 2048);
  EXPECT_EQ(arena->nbytes(), 1536);
  BlockMemory shared(Device(), needs, arena, true);
  EXPECT_EQ(shared.owned_bytes(), 0);
  EXPECT_EQ(arena->nbytes(), 3584);
  EXPECT_THROW(BlockMemory(Device(), needs, nullptr, true), InvalidArgumentError);

  // Both blocks work in the arena's scratch; only the sharing block's forward is recorded.
  float* scratch = nullptr;
  {
    BlockMemory::Call call(shared);  // holds the arena's lock: one Call at a time
    scratch = call.scratch();
    call.forward_starts();
    call.forward_done({5});
    EXPECT_NO_THROW(call.check_saved({5}, "backward"));
    EXPECT_THROW(call.check_saved({4, 1}, "backward"), InvalidArgumentError);
  }
  {
    BlockMemory::Call call(scratch_only);
    EXPECT_EQ(call.scratch(), scratch);
    call.forward_starts();
    call.forward_done({9});
    EXPECT_NO_THROW(call.check_saved({1}, "backward"));  // saved activations of its own
  }
  EXPECT_NO_THROW(BlockMemory::Call(shared).check_saved({5}, "backward"));
  BlockMemory other(Device(), needs, arena, true);
  {
    BlockMemory::Call call(other);
    call.forward_starts();
    call.forward_done({5});
  }
  EXPECT_THROW(BlockMemory::Call(shared).check_saved({5}, "backward"), InvalidArgumentError);
}

}  // namespace
}  // namespace cudablocks
