// BlockArena, the activation memory blocks of one device share, and BlockMemory, a block's view of
// its activation memory (see cudablocks/block_arena.hpp).
#include "cudablocks/block_arena.hpp"

#include <string>
#include <utility>

#include "core/gpu_runtime.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

namespace {

// No buffer (Buffer(), which reports the size of one float) for nothing needed.
Buffer allocate_bytes(std::int64_t bytes, const Device& device) {
  return bytes > 0 ? Buffer::empty({bytes}, DType::UInt8, device) : Buffer();
}

std::int64_t bytes_of(const Buffer& b) { return b.data() != nullptr ? static_cast<std::int64_t>(b.nbytes()) : 0; }

std::int64_t need_of(const ActivationNeeds& needs, BlockArena::Region region) {
  switch (region) {
    case BlockArena::Region::Scratch: return needs.scratch;
    case BlockArena::Region::ScratchBf16: return needs.scratch_bf16;
    case BlockArena::Region::Saved: return needs.saved;
  }
  return 0;
}

}  // namespace

// ---- BlockArena ---------------------------------------------------------------------------------

const char* BlockArena::region_name(Region region) {
  switch (region) {
    case Region::Scratch: return "scratch";
    case Region::ScratchBf16: return "bf16 scratch";
    case Region::Saved: return "saved activations";
  }
  return "?";
}

BlockArena::BlockArena(const Device& device) : device_(device) {}

std::int64_t BlockArena::nbytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::int64_t total = 0;
  for (const Buffer& b : regions_) total += bytes_of(b);
  return total;
}

std::int64_t BlockArena::region_bytes(Region region) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return bytes_of(regions_[static_cast<int>(region)]);
}

std::uint64_t BlockArena::register_block(const ActivationNeeds& needs) {
  std::lock_guard<std::mutex> lock(mutex_);
  // Allocate every larger region first: an allocation failure leaves the arena as it was.
  std::array<Buffer, kRegions> grown;
  bool any = false;
  for (int r = 0; r < kRegions; ++r) {
    const std::int64_t need = need_of(needs, static_cast<Region>(r));
    if (need < 0) throw InvalidArgumentError(std::string("BlockArena: negative ") + region_name(static_cast<Region>(r)) + " size");
    if (need > bytes_of(regions_[r])) {
      grown[r] = allocate_bytes(need, device_);
      any = true;
    }
  }
  if (any && device_.is_cuda()) {
    // Work queued by earlier calls may still read the buffers about to be released.
    DeviceGuard guard(device_);
    gpu::device_synchronize();
  }
  for (int r = 0; r < kRegions; ++r) {
    if (grown[r].data() == nullptr) continue;
    regions_[r] = std::move(grown[r]);
    if (static_cast<Region>(r) == Region::Saved) {  // the activations it held are gone
      saved_writer_ = 0;
      saved_seq_lens_.clear();
    }
  }
  return ++last_id_;
}

BlockArena::Lease::Lease(BlockArena& arena) : arena_(arena), lock_(arena.mutex_) {}

void* BlockArena::Lease::data(Region region) const { return arena_.regions_[static_cast<int>(region)].data(); }

bool BlockArena::Lease::saved_holds(std::uint64_t id, const std::vector<std::int64_t>& seq_lens) const {
  return id != 0 && arena_.saved_writer_ == id && arena_.saved_seq_lens_ == seq_lens;
}

void BlockArena::Lease::set_saved_writer(std::uint64_t id, const std::vector<std::int64_t>& seq_lens) {
  arena_.saved_writer_ = id;
  arena_.saved_seq_lens_ = seq_lens;
}

// ---- BlockMemory --------------------------------------------------------------------------------

void BlockMemory::validate(const Device& device, const std::shared_ptr<BlockArena>& arena, bool share_saved) {
  if (share_saved && arena == nullptr) {
    throw InvalidArgumentError("share_activations needs an arena: pass arena=cudablocks.BlockArena(device), shared by "
                               "the blocks that run one at a time");
  }
  if (arena != nullptr && arena->device() != device) {
    throw DeviceError("the arena is on " + arena->device().str() + " but the block is on " + device.str() +
                      "; use one BlockArena per device");
  }
}

BlockMemory::BlockMemory(const Device& device, const ActivationNeeds& needs, std::shared_ptr<BlockArena> arena,
                         bool share_saved)
    : arena_(std::move(arena)), share_saved_(share_saved) {
  validate(device, arena_, share_saved_);
  if (arena_ == nullptr) {
    scratch_ = allocate_bytes(needs.scratch, device);
    scratch_bf16_ = allocate_bytes(needs.scratch_bf16, device);
  }
  if (!share_saved_) saved_ = allocate_bytes(needs.saved, device);
  if (arena_ != nullptr) {
    ActivationNeeds shared = needs;
    if (!share_saved_) shared.saved = 0;
    id_ = arena_->register_block(shared);
  }
}

std::int64_t BlockMemory::owned_bytes() const {
  return bytes_of(scratch_) + bytes_of(scratch_bf16_) + bytes_of(saved_);
}

BlockMemory::Call::Call(BlockMemory& memory) : memory_(memory) {
  using Region = BlockArena::Region;
  saved_ = memory.saved_.data();
  scratch_ = memory.scratch_.data();
  scratch_bf16_ = memory.scratch_bf16_.data();
  if (memory.arena_ == nullptr) return;
  lease_.emplace(*memory.arena_);
  scratch_ = lease_->data(Region::Scratch);
  scratch_bf16_ = lease_->data(Region::ScratchBf16);
  if (memory.share_saved_) saved_ = lease_->data(Region::Saved);
}

void BlockMemory::Call::forward_starts() {
  if (memory_.share_saved_) lease_->set_saved_writer(0, {});
}

void BlockMemory::Call::forward_done(const std::vector<std::int64_t>& seq_lens) {
  if (memory_.share_saved_) lease_->set_saved_writer(memory_.id_, seq_lens);
}

void BlockMemory::Call::check_saved(const std::vector<std::int64_t>& seq_lens, const char* call) const {
  if (memory_.share_saved_ && !lease_->saved_holds(memory_.id_, seq_lens)) {
    throw InvalidArgumentError(std::string(call) +
                               ": this block shares saved activations: run its forward again right before its " +
                               call + " (recomputation); the shared memory now holds another forward, or none");
  }
}

}  // namespace cudablocks
