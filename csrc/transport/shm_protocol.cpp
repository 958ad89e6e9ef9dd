#include "transport/shm_protocol.h"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <sstream>
#include <thread>

#include "transport/shm_error.h"

namespace alltoall::transport {

namespace {

constexpr uint32_t kMessageMagic = 0xa2a05e9d;
constexpr uint32_t kInline = 1;      // the bytes follow the header in the ring
constexpr uint32_t kSingleCopy = 2;  // the receiver reads them from the sender's memory

struct MessageHeader {
  uint32_t magic;
  uint32_t kind;
  uint64_t call;
  uint64_t bytes;
  uint64_t address;
};
static_assert(sizeof(MessageHeader) == 32, "the ring is sized in 32-byte headers");

struct alignas(64) Counter {
  std::atomic<uint64_t> value;
};

// Per member: where its peers may read a known word, to probe whether the
// kernel lets them (process_vm_readv needs ptrace access to this process).
struct alignas(64) ProbeSlot {
  std::atomic<uint64_t> address;
  std::atomic<uint32_t> pid;
  std::atomic<uint32_t> can_read_all;
};

constexpr uint64_t kProbeValue = 0x5eed0fa11a110a11ULL;
const uint64_t probe_word = kProbeValue;

class HostByteMover final : public ByteMover {
 public:
  void copy(uint8_t* dst, const uint8_t* src, size_t bytes) const override { std::memcpy(dst, src, bytes); }

  bool read_remote(int32_t pid, uint64_t remote_address, uint8_t* dst, size_t bytes) const override {
    size_t done = 0;
    while (done < bytes) {
      struct iovec local {dst + done, bytes - done};
      struct iovec remote {reinterpret_cast<void*>(remote_address + done), bytes - done};
      const ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
      if (n <= 0) return false;
      done += static_cast<size_t>(n);
    }
    return true;
  }
};

}  // namespace

const ByteMover& host_byte_mover() {
  static const HostByteMover mover;
  return mover;
}

// Where everything sits in the payload, for p members.
struct ShmProtocol::Layout {
  Doorbell* doorbells;  // [p]
  ProbeSlot* probes;    // [p]
  Counter* posted;      // [src * p + dst], written by src
  Counter* consumed;    // [src * p + dst], written by dst
  uint8_t* rings;       // [src * p + dst] rings of ring_bytes

  static size_t bytes(int p, size_t ring_bytes) {
    const size_t n = static_cast<size_t>(p);
    return n * sizeof(Doorbell) + n * sizeof(ProbeSlot) + 2 * n * n * sizeof(Counter) + n * n * ring_bytes;
  }

  Layout(uint8_t* base, int p) {
    const size_t n = static_cast<size_t>(p);
    doorbells = reinterpret_cast<Doorbell*>(base);
    probes = reinterpret_cast<ProbeSlot*>(doorbells + n);
    posted = reinterpret_cast<Counter*>(probes + n);
    consumed = posted + n * n;
    rings = reinterpret_cast<uint8_t*>(consumed + n * n);
  }
};

size_t ShmProtocol::payload_bytes(int members, size_t ring_bytes) { return Layout::bytes(members, ring_bytes); }

ShmProtocol::ShmProtocol(ShmSegment segment, ProtocolOptions options, const ByteMover& mover)
    : segment_(std::move(segment)),
      options_(options),
      mover_(mover),
      rank_(segment_.rank()),
      size_(segment_.size()),
      sent_(segment_.size(), 0),
      received_(segment_.size(), 0),
      freed_(segment_.size(), 0),
      base_(segment_.payload()) {
  if (options_.ring_bytes < 2 * sizeof(MessageHeader) || options_.ring_bytes % 64 != 0) {
    throw ShmError("ring size " + std::to_string(options_.ring_bytes) + " must be a multiple of 64 and at least " +
                   std::to_string(2 * sizeof(MessageHeader)) + " bytes");
  }
  if (segment_.payload_bytes() < payload_bytes(size_, options_.ring_bytes)) {
    throw ShmError("segment " + segment_.name() + " holds " + std::to_string(segment_.payload_bytes()) +
                   " payload bytes but the protocol needs " + std::to_string(payload_bytes(size_, options_.ring_bytes)));
  }
  probe_single_copy();
}

void ShmProtocol::probe_single_copy() {
  Layout layout(base_, size_);
  ProbeSlot& mine = layout.probes[rank_];
  mine.address.store(reinterpret_cast<uint64_t>(&probe_word), std::memory_order_relaxed);
  mine.pid.store(static_cast<uint32_t>(getpid()), std::memory_order_relaxed);
  segment_.barrier(1, "shared-memory set-up (publish)");
  bool ok = options_.single_copy_bytes > 0;
  for (int peer = 0; ok && peer < size_; ++peer) {
    if (peer == rank_) continue;
    uint64_t value = 0;
    const ProbeSlot& slot = layout.probes[peer];
    ok = mover_.read_remote(static_cast<int32_t>(slot.pid.load(std::memory_order_relaxed)),
                            slot.address.load(std::memory_order_relaxed), reinterpret_cast<uint8_t*>(&value),
                            sizeof(value)) &&
         value == kProbeValue;
  }
  mine.can_read_all.store(ok ? 1 : 0, std::memory_order_relaxed);
  segment_.barrier(2, "shared-memory set-up (probe)");
  single_copy_ = true;
  for (int peer = 0; peer < size_; ++peer) {
    single_copy_ = single_copy_ && layout.probes[peer].can_read_all.load(std::memory_order_relaxed) == 1;
  }
  // Peer-written once, at attach: keep this rank's copy, so a later write
  // into the table cannot redirect cross-memory reads.
  pids_.resize(size_);
  for (int peer = 0; peer < size_; ++peer) {
    pids_[peer] = segment_.pid_of(peer);
    if (pids_[peer] <= 0) {
      throw ShmError("group rank " + std::to_string(peer) + " recorded pid " + std::to_string(pids_[peer]) +
                     " in segment " + segment_.name() + " (corrupt segment)");
    }
  }
}

void ShmProtocol::ring_everyone() noexcept {
  Layout layout(base_, size_);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  for (int j = 0; j < size_; ++j) {
    if (j != rank_) ring_doorbell(layout.doorbells[j]);
  }
}

void ShmProtocol::abort(const std::string& reason) noexcept {
  segment_.mark_aborted(reason, -1);
  ring_everyone();
}

void ShmProtocol::fail_aborted(const std::vector<int>& waiting_on) {
  // A peer that died without marking its slot is the cause; one that
  // marked it and then left said why, so its message is reported.
  for (int j : waiting_on) {
    if (!segment_.marked(j) && !segment_.alive(j)) fail_waiting(waiting_on, false);
  }
  broken_ = true;
  broken_reason_ = "aborted";
  throw ShmAborted("the shared-memory segment was aborted: " + segment_.abort_report(), segment_.abort_origin());
}

void ShmProtocol::test_poke(const std::string& field, int peer, const std::vector<uint64_t>& values) {
  if (peer < 0 || peer >= size_ || peer == rank_) throw ShmError("test_poke: bad peer " + std::to_string(peer));
  Layout layout(base_, size_);
  const size_t p = static_cast<size_t>(size_);
  if (field == "posted" && values.size() == 1) {
    layout.posted[static_cast<size_t>(rank_) * p + peer].value.store(values[0], std::memory_order_release);
  } else if (field == "consumed" && values.size() == 1) {
    layout.consumed[static_cast<size_t>(peer) * p + rank_].value.store(values[0], std::memory_order_release);
  } else if (field == "header" && values.size() == 4) {
    const size_t pair = static_cast<size_t>(rank_) * p + peer;
    MessageHeader h{kMessageMagic, static_cast<uint32_t>(values[1]), values[0], values[2], values[3]};
    uint64_t at = layout.posted[pair].value.load(std::memory_order_relaxed);
    uint8_t* ring = layout.rings + pair * options_.ring_bytes;
    const auto* src = reinterpret_cast<const uint8_t*>(&h);
    for (size_t i = 0; i < sizeof(h); ++i) ring[(at + i) % options_.ring_bytes] = src[i];
    sent_[peer] = at + sizeof(h);
    layout.posted[pair].value.store(sent_[peer], std::memory_order_release);
  } else {
    throw ShmError("test_poke: unknown field '" + field + "' or wrong number of values");
  }
  ring_everyone();
}

namespace {

// A ring of `size` bytes holding a monotonic byte stream: position p sits at
// p % size, so a span may wrap once.
void ring_write(const ByteMover& mover, uint8_t* ring, size_t size, uint64_t at, const uint8_t* src, size_t n) {
  const size_t offset = at % size;
  const size_t first = std::min(n, size - offset);
  mover.copy(ring + offset, src, first);
  if (first < n) mover.copy(ring, src + first, n - first);
}

void ring_read(const ByteMover& mover, const uint8_t* ring, size_t size, uint64_t at, uint8_t* dst, size_t n) {
  const size_t offset = at % size;
  const size_t first = std::min(n, size - offset);
  mover.copy(dst, ring + offset, first);
  if (first < n) mover.copy(dst + first, ring, n - first);
}

enum class Stage : uint8_t { kDone, kHeader, kBytes, kAwaitRead };

}  // namespace

void ShmProtocol::exchange(const std::vector<PeerTransfer>& transfers) {
  // Any failure here marks the segment before it unwinds: peers stop
  // waiting for this rank, and a single-copy buffer of this rank that a
  // peer may still read is only freed after the word is set.
  try {
    exchange_locked(transfers);
  } catch (const ShmAborted& error) {
    segment_.mark_aborted(error.what(), error.origin);
    ring_everyone();
    throw;
  } catch (const ShmError& error) {
    segment_.mark_aborted(error.what(), -1);
    ring_everyone();
    throw;
  }
}

void ShmProtocol::exchange_locked(const std::vector<PeerTransfer>& transfers) {
  if (segment_.aborted()) fail_aborted({});
  if (broken_) throw ShmError("the shared-memory transport is unusable after an earlier failure (" + broken_reason_ + ")");
  if (static_cast<int>(transfers.size()) != size_) {
    throw ShmError(std::to_string(transfers.size()) + " transfers for a group of " +
                   std::to_string(size_));
  }
  const PeerTransfer& own = transfers[rank_];
  if (own.send_bytes != own.recv_bytes) {
    throw ShmError("this rank sends itself " + std::to_string(own.send_bytes) + " bytes but expects " +
                   std::to_string(own.recv_bytes));
  }
  if (own.send_bytes > 0) mover_.copy(own.recv, own.send, own.send_bytes);
  if (size_ == 1) return;

  const uint64_t call = ++calls_;
  const size_t ring_bytes = options_.ring_bytes;
  const size_t p = static_cast<size_t>(size_);
  Layout layout(base_, size_);
  Doorbell& my_doorbell = layout.doorbells[rank_];

  // Per peer: how far its send and its receive have got.
  std::vector<Stage> send_stage(p, Stage::kDone), recv_stage(p, Stage::kDone);
  std::vector<size_t> send_done(p, 0), recv_done(p, 0);
  std::vector<uint64_t> await_read_at(p, 0);
  std::vector<uint8_t> touched(p, 0);
  int pending = 0;
  for (int j = 0; j < size_; ++j) {
    if (j == rank_) continue;
    send_stage[j] = Stage::kHeader;
    recv_stage[j] = Stage::kHeader;
    pending += 2;
  }

  auto fail = [&](const std::string& reason) {
    broken_ = true;
    broken_reason_ = reason;
    throw ShmError(reason);
  };

  auto push = [&](int j) -> bool {
    const PeerTransfer& t = transfers[j];
    uint8_t* ring = layout.rings + (static_cast<size_t>(rank_) * p + j) * ring_bytes;
    const uint64_t freed = layout.consumed[static_cast<size_t>(rank_) * p + j].value.load(std::memory_order_acquire);
    // Peer-written: it can neither pass what was sent nor fall back more
    // than a ring behind, or the space arithmetic below would wrap.
    if (freed > sent_[j] || freed < freed_[j] || sent_[j] - freed > ring_bytes) {
      fail("group rank " + std::to_string(j) + " (global rank " + std::to_string(segment_.global_ranks()[j]) +
           ") wrote an impossible consumed counter " + std::to_string(freed) + " (this rank has sent " +
           std::to_string(sent_[j]) + " bytes, of which it had read " + std::to_string(freed_[j]) + ", through a ring of " + std::to_string(ring_bytes) +
           "): corrupt shared memory");
    }
    freed_[j] = freed;
    if (send_stage[j] == Stage::kAwaitRead) {
      if (freed < await_read_at[j]) return false;
      send_stage[j] = Stage::kDone;
      --pending;
      return true;
    }
    size_t space = ring_bytes - static_cast<size_t>(sent_[j] - freed);
    bool moved = false;
    if (send_stage[j] == Stage::kHeader) {
      if (space < sizeof(MessageHeader)) return false;
      const bool single = single_copy_ && t.send_bytes >= options_.single_copy_bytes;
      MessageHeader h{kMessageMagic, single ? kSingleCopy : kInline, call, t.send_bytes,
                      reinterpret_cast<uint64_t>(t.send)};
      ring_write(mover_, ring, ring_bytes, sent_[j], reinterpret_cast<const uint8_t*>(&h), sizeof(h));
      sent_[j] += sizeof(h);
      space -= sizeof(h);
      moved = true;
      if (single) {
        send_stage[j] = Stage::kAwaitRead;
        await_read_at[j] = sent_[j];
      } else {
        send_stage[j] = Stage::kBytes;
      }
    }
    if (send_stage[j] == Stage::kBytes) {
      const size_t n = std::min(space, t.send_bytes - send_done[j]);
      if (n > 0) {
        ring_write(mover_, ring, ring_bytes, sent_[j], t.send + send_done[j], n);
        sent_[j] += n;
        send_done[j] += n;
        moved = true;
      }
      if (send_done[j] == t.send_bytes) {
        send_stage[j] = Stage::kDone;
        --pending;
      }
    }
    if (moved) {
      layout.posted[static_cast<size_t>(rank_) * p + j].value.store(sent_[j], std::memory_order_release);
      touched[j] = 1;
    }
    return moved;
  };

  auto pull = [&](int j) -> bool {
    const PeerTransfer& t = transfers[j];
    const size_t pair = static_cast<size_t>(j) * p + rank_;
    const uint8_t* ring = layout.rings + pair * ring_bytes;
    const uint64_t ready = layout.posted[pair].value.load(std::memory_order_acquire);
    if (ready < received_[j] || ready - received_[j] > ring_bytes) {
      fail("group rank " + std::to_string(j) + " (global rank " + std::to_string(segment_.global_ranks()[j]) +
           ") wrote an impossible posted counter " + std::to_string(ready) + " (this rank has received " +
           std::to_string(received_[j]) + " bytes through a ring of " + std::to_string(ring_bytes) +
           "): corrupt shared memory");
    }
    size_t available = static_cast<size_t>(ready - received_[j]);
    bool moved = false;
    if (recv_stage[j] == Stage::kHeader) {
      if (available < sizeof(MessageHeader)) return false;
      MessageHeader h{};
      ring_read(mover_, ring, ring_bytes, received_[j], reinterpret_cast<uint8_t*>(&h), sizeof(h));
      if (h.magic != kMessageMagic || h.call != call) {
        fail("the message from group rank " + std::to_string(j) + " belongs to call " + std::to_string(h.call) +
             " of this transport, but this rank is in call " + std::to_string(call) +
             " (the ranks issued different collectives on this group)");
      }
      if (h.kind != kInline && !(h.kind == kSingleCopy && single_copy_)) {
        fail("group rank " + std::to_string(j) + " sent a message header of kind " + std::to_string(h.kind) +
             " (corrupt shared memory)");
      }
      if (h.bytes != t.recv_bytes) {
        fail("group rank " + std::to_string(j) + " sends " + std::to_string(h.bytes) + " bytes but this rank expects " +
             std::to_string(t.recv_bytes) + " (the ranks' splits disagree)");
      }
      if (h.kind == kSingleCopy) {
        // The sender waits for `consumed` to pass this header before it
        // reuses its buffer, so advance it only once the bytes are here.
        if (h.address == 0 || h.address + t.recv_bytes < h.address) {
          fail("group rank " + std::to_string(j) + " sent an impossible buffer address " + std::to_string(h.address) +
               " for " + std::to_string(t.recv_bytes) + " bytes (corrupt shared memory)");
        }
        if (!mover_.read_remote(pids_[j], h.address, t.recv, t.recv_bytes)) {
          // A sender that is dying cannot be read: the kernel drops its
          // memory before its files, so give its lock a moment to go.
          for (int i = 0; i < 100 && segment_.alive(j); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
          if (!segment_.alive(j)) fail_waiting({j}, false);
          fail("cross-memory read of " + std::to_string(t.recv_bytes) + " bytes from group rank " +
               std::to_string(j) + " failed");
        }
        // A sender that gave up marks the word before it frees the buffer:
        // bytes read after that may be anything, so they are not used.
        std::atomic_thread_fence(std::memory_order_seq_cst);
        if (segment_.aborted()) fail_aborted({j});
        recv_done[j] = t.recv_bytes;
      }
      received_[j] += sizeof(h);
      available -= sizeof(h);
      recv_stage[j] = h.kind == kSingleCopy ? Stage::kDone : Stage::kBytes;
      moved = true;
    }
    if (recv_stage[j] == Stage::kBytes) {
      const size_t n = std::min(available, t.recv_bytes - recv_done[j]);
      if (n > 0) {
        ring_read(mover_, ring, ring_bytes, received_[j], t.recv + recv_done[j], n);
        received_[j] += n;
        recv_done[j] += n;
        moved = true;
      }
      if (recv_done[j] == t.recv_bytes) recv_stage[j] = Stage::kDone;
    }
    if (recv_stage[j] == Stage::kDone) --pending;
    if (moved) {
      layout.consumed[pair].value.store(received_[j], std::memory_order_release);
      touched[j] = 1;
    }
    return moved;
  };

  // One pass over every unfinished send and receive, peers in rotated order
  // so that ranks do not all queue on the same peer. Peers whose rings
  // changed are woken if they sleep.
  auto pass = [&]() -> bool {
    bool moved = false;
    for (int k = 1; k < size_; ++k) {
      const int to = (rank_ + k) % size_;
      if (send_stage[to] != Stage::kDone) moved |= push(to);
      const int from = (rank_ - k + size_) % size_;
      if (recv_stage[from] != Stage::kDone) moved |= pull(from);
    }
    if (moved) {
      std::atomic_thread_fence(std::memory_order_seq_cst);
      for (int j = 0; j < size_; ++j) {
        if (!touched[j]) continue;
        touched[j] = 0;
        ring_doorbell(layout.doorbells[j]);
      }
    }
    return moved;
  };

  const WaitPolicy& policy = options_.wait;
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + segment_.timeout();
  auto next_liveness = start + std::chrono::milliseconds(200);
  int idle = 0;
  while (pending > 0) {
    if (pass()) {
      idle = 0;
      continue;
    }
    ++idle;
    if (idle <= policy.spins) {
      cpu_relax();
      continue;
    }
    if (idle <= policy.spins + policy.yields) {
      sched_yield();
      continue;
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= next_liveness || now >= deadline) {
      next_liveness = now + std::chrono::milliseconds(200);
      std::vector<int> waiting_on;
      for (int j = 0; j < size_; ++j) {
        if (send_stage[j] != Stage::kDone || recv_stage[j] != Stage::kDone) waiting_on.push_back(j);
      }
      bool dead = false;
      for (int j : waiting_on) dead = dead || !segment_.alive(j);
      if (dead || now >= deadline) fail_waiting(waiting_on, !dead);
    }
    if (segment_.aborted()) {
      std::vector<int> waiting_on;
      for (int j = 0; j < size_; ++j) {
        if (send_stage[j] != Stage::kDone || recv_stage[j] != Stage::kDone) waiting_on.push_back(j);
      }
      fail_aborted(waiting_on);
    }
    if (sleep_on_doorbell(my_doorbell, policy.sleep_slice, [&] { return pass() || segment_.aborted(); })) idle = 0;
  }
}

void ShmProtocol::fail_waiting(const std::vector<int>& waiting_on, bool timed_out) {
  broken_ = true;
  std::vector<int> dead;
  for (int j : waiting_on) {
    if (!segment_.alive(j)) dead.push_back(j);
  }
  if (!timed_out || !dead.empty()) {
    std::vector<int> global;
    for (int j : dead) global.push_back(segment_.global_ranks()[j]);
    broken_reason_ = "peer(s) died";
    throw ShmPeerDied("group rank(s) " + format_ranks(dead) + " (global rank(s) " + format_ranks(global) +
                      ") left while this rank waited for them in shared memory (their process exited, or closed this "
                      "group's transport)");
  }
  broken_reason_ = "timeout";
  throw ShmError("timed out after " + std::to_string(segment_.timeout().count()) +
                 " ms waiting in shared memory for group rank(s) " + format_ranks(waiting_on));
}

}  // namespace alltoall::transport
