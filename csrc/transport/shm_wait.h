// How a member waits for its peers in shared memory when ranks outnumber
// cores: a short busy poll, then sched_yield, then a futex sleep on its own
// doorbell. A pure spin collapses when 8 ranks share 2 cores (the spinning
// rank burns the time slice its peer needs); a sleep at once pays a wake-up
// on every message. docs/architecture.md has the measurements behind the
// defaults.
#pragma once

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <ctime>

namespace alltoall::transport {

struct WaitPolicy {
  int spins = 32;   // polls of the pending work before yielding
  int yields = 64;  // sched_yield calls before sleeping on the doorbell
  // Longest futex sleep before the waiter checks its deadline and whether
  // its peers are alive. Wake-ups do not depend on it.
  std::chrono::milliseconds sleep_slice{50};
};

// One per member, in shared memory, on its own cache line. Peers ring it
// after they post data for this member or free space in a ring it writes.
struct alignas(64) Doorbell {
  std::atomic<uint32_t> rings;
  std::atomic<uint32_t> sleeping;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Wakes `peer` if it sleeps. The caller has published its counters and
// issued a seq_cst fence, so either the sleeper's re-check sees them or this
// load sees its `sleeping` flag (the two sides form a Dekker pair).
inline void ring_doorbell(Doorbell& peer) {
  if (peer.sleeping.load(std::memory_order_seq_cst) == 0) return;
  peer.rings.fetch_add(1, std::memory_order_seq_cst);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&peer.rings), FUTEX_WAKE, 1, nullptr, nullptr, 0);
}

// Sleeps on this member's own doorbell until a peer rings it or `slice`
// passes. `recheck()` runs after announcing the sleep and returns true when
// there is work after all, in which case there is no sleep.
template <typename Recheck>
bool sleep_on_doorbell(Doorbell& mine, std::chrono::milliseconds slice, Recheck&& recheck) {
  const uint32_t seen = mine.rings.load(std::memory_order_seq_cst);
  mine.sleeping.store(1, std::memory_order_seq_cst);
  // The recheck's loads are acquire loads: without a full fence they may be
  // satisfied before the store above is visible (store-load reordering;
  // x86's xchg happens to forbid it, AArch64's stlr does not), and the
  // Dekker pair with ring_doorbell would lose a wake-up.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (recheck()) {
    mine.sleeping.store(0, std::memory_order_relaxed);
    return true;
  }
  struct timespec ts {};
  ts.tv_sec = slice.count() / 1000;
  ts.tv_nsec = (slice.count() % 1000) * 1000000;
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&mine.rings), FUTEX_WAIT, seen, &ts, nullptr, 0);
  mine.sleeping.store(0, std::memory_order_relaxed);
  return false;
}

}  // namespace alltoall::transport
