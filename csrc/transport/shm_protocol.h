// The shared-memory exchange protocol: slots, flags and chunking, apart from
// the byte moves (ByteMover) so that a CUDA IPC mover for NVLink can sit
// beside the host one later (docs/architecture.md).
//
// Every ordered pair (src, dst) of members owns a byte ring in the segment,
// written only by src and read only by dst, with two monotonic counters:
// `posted` (bytes src has written, release) and `consumed` (bytes dst has
// read, release). No locks: each counter has one writer. Every message is a
// 32-byte header (call number, length, kind) and then its bytes; a message
// larger than the ring streams through it in chunks. Large messages may
// instead carry only the sender's address, and the receiver copies them
// straight out of the sender's memory (cross-memory attach, one copy).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "transport/shm_segment.h"
#include "transport/shm_wait.h"

namespace alltoall::transport {

// How bytes move. The host mover uses memcpy and process_vm_readv.
class ByteMover {
 public:
  virtual ~ByteMover() = default;
  // Into or out of the segment (both pointers are mapped here).
  virtual void copy(uint8_t* dst, const uint8_t* src, size_t bytes) const = 0;
  // From another process's memory; false when the kernel refuses.
  virtual bool read_remote(int32_t pid, uint64_t remote_address, uint8_t* dst, size_t bytes) const = 0;
};

const ByteMover& host_byte_mover();

struct ProtocolOptions {
  size_t ring_bytes = 256 * 1024;  // per ordered pair
  // Messages of at least this many bytes go by cross-memory attach when
  // every member can use it; 0 disables it.
  size_t single_copy_bytes = 64 * 1024;  // as alltoall/transport/shm.py and the docs
  WaitPolicy wait;
};

// One member's side of an exchange with peer j: what it sends to j and
// where what j sends it goes. Lengths in bytes.
struct PeerTransfer {
  const uint8_t* send = nullptr;
  size_t send_bytes = 0;
  uint8_t* recv = nullptr;
  size_t recv_bytes = 0;
};

class ShmProtocol {
 public:
  // Bytes of segment payload the protocol needs for `members` ranks.
  static size_t payload_bytes(int members, size_t ring_bytes);

  // Lays the protocol over an attached segment. Collective over the
  // segment's members (it probes cross-memory attach with two barriers).
  ShmProtocol(ShmSegment segment, ProtocolOptions options, const ByteMover& mover = host_byte_mover());

  // Sends transfers[j].send to member j and receives from j into
  // transfers[j].recv, for every j (j == rank is a local copy). Returns when
  // this member's receives are complete and its send buffers may be reused.
  // Throws ShmError (ShmPeerDied for a dead peer); the caller names the step.
  void exchange(const std::vector<PeerTransfer>& transfers);

  // Marks the segment's abort word with this member's `reason` and wakes
  // every peer: they raise within their next check, naming this rank. Safe
  // from any thread, also while an exchange runs; never throws.
  void abort(const std::string& reason) noexcept;

  // Test hook: writes what a corrupt or hostile peer could into this
  // member's own side of the segment. `field`: "posted" (posted[rank][peer]
  // = value), "consumed" (consumed[peer][rank] = value) or "header" (a
  // header {call, kind, bytes, address} = values at posted[rank][peer],
  // which then advances past it).
  void test_poke(const std::string& field, int peer, const std::vector<uint64_t>& values);

  bool single_copy() const { return single_copy_; }
  const ShmSegment& segment() const { return segment_; }
  const ProtocolOptions& options() const { return options_; }

 private:
  struct Layout;
  void probe_single_copy();
  void exchange_locked(const std::vector<PeerTransfer>& transfers);
  [[noreturn]] void fail_waiting(const std::vector<int>& waiting_on, bool timed_out);
  // Raises for an aborted segment: a dead peer among `waiting_on` first
  // (its death is the cause), else the member(s) that marked the word.
  [[noreturn]] void fail_aborted(const std::vector<int>& waiting_on);
  void ring_everyone() noexcept;

  ShmSegment segment_;
  ProtocolOptions options_;
  const ByteMover& mover_;
  int rank_;
  int size_;
  bool single_copy_ = false;
  bool broken_ = false;
  std::string broken_reason_;
  uint64_t calls_ = 0;
  // This member's own counters: the only writer keeps them locally.
  std::vector<uint64_t> sent_;      // posted[rank][j]
  std::vector<uint64_t> received_;  // consumed[j][rank]
  std::vector<uint64_t> freed_;     // consumed[rank][j] as last read: it never goes back
  std::vector<int32_t> pids_;       // the members' pids, read once after set-up
  uint8_t* base_ = nullptr;
};

}  // namespace alltoall::transport
