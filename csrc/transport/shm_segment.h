// A POSIX shared-memory segment shared by the members of one group on one
// host: creation, attachment with a job token, liveness of the members, and
// the abort word that lets a member that fails alone stop its peers.
// Plain POSIX, no torch: the protocol on top of it (shm_protocol.h) decides
// what the bytes mean.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace alltoall::transport {

struct SegmentSpec {
  std::string name;              // "/alltoall-<random>", agreed through the group
  std::string token;             // the job token; a process without it cannot attach
  std::vector<int> global_ranks;  // the group's members, in group order
  int rank = 0;                  // this process's rank in the group
  size_t bytes = 0;              // payload bytes after the header
  std::chrono::milliseconds timeout{600000};
};

// One member's abort record (after the header's tables), written only by
// that member: `state` 0 (none), 1 (being written), 2 (written, release).
struct alignas(64) AbortSlot {
  std::atomic<uint32_t> state;
  int32_t cause;  // -1: this member failed by itself; else the group rank whose failure it followed
  char message[504];
};
static_assert(sizeof(AbortSlot) == 512, "abort slots are 512 bytes");

// The mapping of a segment. Member `rank` holds a POSIX record lock on byte
// `rank` of the file for as long as it lives: the kernel drops it when the
// process dies (before it is reaped), which is how a survivor tells a dead
// peer from a slow one.
class ShmSegment {
 public:
  // The creator makes the file (mode 0600, O_EXCL), reserves its bytes
  // (posix_fallocate: ShmSpaceError when /dev/shm cannot hold them) and
  // initialises it. The others wait (bounded) for it, require it to be
  // owned by this effective uid with mode 0600, check the token and their
  // membership on the header alone, and only then map the rest.
  static ShmSegment create(const SegmentSpec& spec);
  static ShmSegment attach(const SegmentSpec& spec);

  ShmSegment(ShmSegment&& other) noexcept;
  ShmSegment& operator=(ShmSegment&&) = delete;
  ShmSegment(const ShmSegment&) = delete;
  ~ShmSegment();

  // Removes the name: the mapping stays, nothing is left in /dev/shm.
  // Safe to call by every member; a missing name is not an error.
  void unlink() const;
  static void unlink_name(const std::string& name);

  // Counts arrivals in the header and waits until all members arrived
  // `round` times (bounded; raises naming the missing members, or the
  // member that aborted the segment).
  void barrier(int round, const std::string& what) const;

  // True while member `rank` holds its lock (it is alive).
  bool alive(int rank) const;
  // The members that hold no lock, for error messages.
  std::vector<int> dead_members() const;

  // The abort word. `mark_aborted` records this member's failure (first
  // message wins; `cause` is the group rank whose abort this one follows,
  // -1 for its own failure) and sets the segment's word. Thread-safe, never
  // throws. Once set, the segment stays broken.
  void mark_aborted(const std::string& message, int cause) const noexcept;
  bool aborted() const noexcept { return abort_word_->load(std::memory_order_acquire) != 0; }
  // "group rank 2 (global rank 5, pid 123) failed: <its message>" for the
  // members that failed by themselves (or, if none did, all that marked).
  std::string abort_report() const;
  // Whether member `rank` marked its abort slot.
  bool marked(int rank) const { return slot(rank)->state.load(std::memory_order_acquire) != 0; }
  // The first member that failed by itself (-1: none marked yet).
  int abort_origin() const;

  uint8_t* payload() const { return base_ + header_bytes_; }
  size_t payload_bytes() const { return payload_bytes_; }
  int rank() const { return rank_; }
  int size() const { return static_cast<int>(global_ranks_.size()); }
  const std::vector<int>& global_ranks() const { return global_ranks_; }
  const std::string& name() const { return name_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  // The file's mode bits, for tests (0600).
  unsigned mode() const;
  // The pid recorded by member `rank` at attach time (peer-written: the
  // protocol copies them once, after its set-up barrier, and checks them).
  int32_t pid_of(int rank) const;
  // Bytes the segment needs for `members` and `payload` bytes (the formula
  // of docs/architecture.md).
  static size_t total_bytes(size_t members, size_t payload);

 private:
  ShmSegment(const SegmentSpec& spec, int fd, uint8_t* base, size_t mapped, size_t header_bytes);
  void lock_own_byte() const;
  AbortSlot* slot(int rank) const;

  std::string name_;
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  size_t mapped_ = 0;
  size_t header_bytes_ = 0;
  size_t payload_bytes_ = 0;
  int rank_ = 0;
  std::vector<int> global_ranks_;
  std::chrono::milliseconds timeout_;
  std::atomic<uint32_t>* abort_word_ = nullptr;
};

}  // namespace alltoall::transport
