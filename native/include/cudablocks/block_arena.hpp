// Activation memory shared by the blocks of one device (DESIGN §3-§4).
//
// For max_tokens, every block needs a transient fp32 scratch and (bf16 products) a bf16 operand
// scratch, dead outside one forward or backward, and the activations it saves from forward to
// backward (block.hpp lists both). A model runs one block at a time, so its blocks can use one set
// of buffers: a block made with a BlockArena takes its scratch from the arena, and with
// share_activations its saved activations too (Qwen3-4B, 4096 tokens: about 1 GB per layer
// otherwise, 36 GB for 36 layers).
//
// The arena holds three regions (Region), each one allocation as large as the largest need
// registered so far. A block resolves its pointers from the arena at every call, never keeps them,
// so a region that grows never leaves a block on a stale buffer.
//
// Rules for the blocks sharing an arena:
//   - Run them on one stream, or synchronise between streams: their scratch is the same memory.
//     Calls from several host threads are serialised (each call holds the arena's lock).
//   - Shared saved activations hold the latest forward of any sharing block. A backward needs its
//     own block's forward, with the same seq_lens, to be that latest one: run the model's forward
//     through every layer, then for each layer from the top run its forward again (recomputation)
//     and its backward. Otherwise backward raises InvalidArgumentError before writing anything.
//   - A region grows only when a block registers (at its construction), never in forward or
//     backward. Growth allocates the new buffer, synchronises the device (queued work may still
//     read the old one) and then releases the old buffer; both exist for that moment. Growing the
//     saved region loses the activations it held.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "cudablocks/buffer.hpp"
#include "cudablocks/device.hpp"

namespace cudablocks {

// Bytes a block needs in each kind of activation memory.
struct ActivationNeeds {
  std::int64_t scratch = 0;       // fp32 work buffers, dead outside a call
  std::int64_t scratch_bf16 = 0;  // bf16 operands of the products (bf16 mode), dead outside a call
  std::int64_t saved = 0;         // activations kept from forward to backward
};

class BlockArena {
 public:
  enum class Region { Scratch = 0, ScratchBf16 = 1, Saved = 2 };
  static constexpr int kRegions = 3;
  static const char* region_name(Region region);  // "scratch", "bf16 scratch", "saved activations"

  explicit BlockArena(const Device& device);
  BlockArena(const BlockArena&) = delete;
  BlockArena& operator=(const BlockArena&) = delete;

  const Device& device() const { return device_; }
  std::int64_t nbytes() const;  // all regions together
  std::int64_t region_bytes(Region region) const;

  // A block joining: grows each region to at least what `needs` asks of it (give saved = 0 for a
  // block that keeps its own saved activations) and returns the block's id in this arena (never 0,
  // never reused), which the saved-activation guard records.
  std::uint64_t register_block(const ActivationNeeds& needs);

  // Exclusive use of the arena for one block call: holds the arena's lock for its lifetime, so
  // registrations (growth) and other blocks' calls wait until the call has queued its work.
  class Lease {
   public:
    explicit Lease(BlockArena& arena);
    void* data(Region region) const;  // nullptr for a region no block needed
    // Whether the saved region holds the forward of block `id` over `seq_lens`.
    bool saved_holds(std::uint64_t id, const std::vector<std::int64_t>& seq_lens) const;
    // Records the saved region's writer: id 0 while a forward is rewriting it.
    void set_saved_writer(std::uint64_t id, const std::vector<std::int64_t>& seq_lens);

   private:
    BlockArena& arena_;
    std::unique_lock<std::mutex> lock_;
  };

 private:
  Device device_;
  mutable std::mutex mutex_;
  std::array<Buffer, kRegions> regions_;
  std::uint64_t last_id_ = 0;
  std::uint64_t saved_writer_ = 0;  // 0: no block's activations
  std::vector<std::int64_t> saved_seq_lens_;
};

// A block's activation memory: buffers of its own, or the regions of a shared BlockArena (the
// scratch; the saved activations too with share_saved), resolved at every call. The block kinds
// hold one; see BlockArena for the rules.
class BlockMemory {
 public:
  BlockMemory() = default;
  // DeviceError when the arena is on another device; InvalidArgumentError for share_saved without
  // an arena. Call before any work, so that a refused block costs nothing.
  static void validate(const Device& device, const std::shared_ptr<BlockArena>& arena, bool share_saved);
  // Allocates what does not come from the arena, and registers with the arena.
  BlockMemory(const Device& device, const ActivationNeeds& needs, std::shared_ptr<BlockArena> arena, bool share_saved);

  const std::shared_ptr<BlockArena>& arena() const { return arena_; }
  bool shares_saved() const { return share_saved_; }
  std::int64_t owned_bytes() const;  // the buffers of its own

  // The pointers of one call. With an arena it holds the arena's lease: keep it for the whole call.
  class Call {
   public:
    explicit Call(BlockMemory& memory);
    float* scratch() const { return static_cast<float*>(scratch_); }
    std::uint16_t* scratch_bf16() const { return static_cast<std::uint16_t*>(scratch_bf16_); }
    float* saved() const { return static_cast<float*>(saved_); }
    // A forward brackets its writes with these (shared saved activations: the writer record).
    void forward_starts();
    void forward_done(const std::vector<std::int64_t>& seq_lens);
    // InvalidArgumentError naming `call` unless the saved activations are those of this block's
    // latest forward over `seq_lens` (always true for saved activations of its own).
    void check_saved(const std::vector<std::int64_t>& seq_lens, const char* call) const;

   private:
    BlockMemory& memory_;
    std::optional<BlockArena::Lease> lease_;
    void *scratch_ = nullptr, *scratch_bf16_ = nullptr, *saved_ = nullptr;
  };

 private:
  std::shared_ptr<BlockArena> arena_;
  bool share_saved_ = false;
  std::uint64_t id_ = 0;  // in the arena
  Buffer scratch_, scratch_bf16_, saved_;  // those of its own
};

}  // namespace cudablocks
