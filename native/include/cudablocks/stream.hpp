// Streams and events. On a CUDA device a Stream is an ordered queue of GPU work; on the CPU,
// work runs inline on the calling thread and streams and events are no-ops.
#pragma once

#include <cstdint>
#include <memory>

#include "cudablocks/device.hpp"

namespace cudablocks {

class Event;

class Stream {
 public:
  // A new stream on `device` (CUDA: non-blocking with respect to the legacy default stream).
  explicit Stream(const Device& device);
  // A stream someone else owns, e.g. a framework's current stream; 0 is the legacy default
  // stream. Not destroyed with this object.
  static Stream wrap(const Device& device, std::uintptr_t handle);

  const Device& device() const;
  // The cudaStream_t as an opaque pointer; nullptr for the legacy default stream and on the CPU.
  void* handle() const;
  // Blocks the calling thread until all work queued so far has finished.
  void synchronize() const;
  // Marks `event` as reached once the work queued so far is done.
  void record(Event& event) const;
  // Makes later work on this stream wait until `event` is reached (no host blocking).
  void wait(const Event& event) const;

  bool operator==(const Stream& other) const { return impl_ == other.impl_ || handle() == other.handle(); }

 private:
  struct Impl;
  explicit Stream(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

class Event {
 public:
  explicit Event(const Device& device, bool timing = false);
  const Device& device() const;
  void* handle() const;  // cudaEvent_t; nullptr on the CPU
  void synchronize() const;
  bool query() const;    // true once reached
  // Milliseconds between `start` and this event (both recorded with timing = true).
  float elapsed_ms_since(const Event& start) const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace cudablocks
