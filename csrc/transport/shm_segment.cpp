#include "transport/shm_segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "transport/shm_error.h"

namespace alltoall::transport {

namespace {

constexpr uint64_t kMagic = 0x616c6c746f616c6cULL;  // "alltoall"
constexpr uint32_t kLayoutVersion = 2;
constexpr size_t kTokenBytes = 64;
constexpr size_t kMaxMembers = 4096;
constexpr const char* kShmDir = "/dev/shm";

// The first bytes of every segment. `magic` is written last by the creator
// (release), so an attacher that sees it sees the rest.
struct Header {
  std::atomic<uint64_t> magic;
  uint32_t layout_version;
  uint32_t members;
  uint64_t payload_bytes;
  char token[kTokenBytes];
  std::atomic<uint64_t> arrivals;  // barrier() counts here
  // Non-zero once any member marked its abort slot: one load tells a
  // healthy segment from a broken one.
  std::atomic<uint32_t> abort_word;
  uint32_t reserved;
  // then: int32_t global_ranks[members]; int32_t pids[members]; (64-aligned) AbortSlot slots[members]
};

size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

size_t slots_offset(size_t members) { return align_up(sizeof(Header) + 2 * members * sizeof(int32_t), 64); }

size_t header_bytes_for(size_t members) { return align_up(slots_offset(members) + members * sizeof(AbortSlot), 4096); }

int32_t* ranks_table(uint8_t* base) { return reinterpret_cast<int32_t*>(base + sizeof(Header)); }
int32_t* pids_table(uint8_t* base, size_t members) { return ranks_table(base) + members; }

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

std::string mib(uint64_t bytes) {
  std::ostringstream out;
  out.precision(1);
  out << std::fixed << static_cast<double>(bytes) / (1024.0 * 1024.0) << " MiB";
  return out.str();
}

void check_spec(const SegmentSpec& spec) {
  if (spec.name.empty() || spec.name[0] != '/' || spec.name.find('/', 1) != std::string::npos) {
    throw ShmError("shared-memory segment name '" + spec.name + "' must be '/' followed by a name without '/'");
  }
  if (spec.token.empty() || spec.token.size() >= kTokenBytes) {
    throw ShmError("job token must have 1 to " + std::to_string(kTokenBytes - 1) + " characters, got " +
                   std::to_string(spec.token.size()));
  }
  if (spec.global_ranks.empty() || spec.global_ranks.size() > kMaxMembers) {
    throw ShmError("a segment group needs 1 to " + std::to_string(kMaxMembers) + " members, got " +
                   std::to_string(spec.global_ranks.size()));
  }
  if (spec.rank < 0 || spec.rank >= static_cast<int>(spec.global_ranks.size())) {
    throw ShmError("rank " + std::to_string(spec.rank) + " is outside a group of " +
                   std::to_string(spec.global_ranks.size()));
  }
}

uint8_t* map(int fd, size_t bytes, const std::string& name) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    throw ShmError("mmap of shared-memory segment " + name + " (" + std::to_string(bytes) + " bytes) failed: " +
                   errno_text(err));
  }
  return static_cast<uint8_t*>(p);
}

// Reserves the file's pages now: on tmpfs, ftruncate and MAP_POPULATE
// reserve nothing, and a page that cannot be backed later is a SIGBUS in
// whichever rank touches it first.
void reserve(int fd, size_t total, const SegmentSpec& spec) {
  int err = posix_fallocate(fd, 0, static_cast<off_t>(total));
  if (err == EOPNOTSUPP || err == EINVAL) {
    // A file system without fallocate (not tmpfs): size it the old way.
    err = ftruncate(fd, static_cast<off_t>(total)) == 0 ? 0 : errno;
  }
  if (err == 0) return;
  if (err == ENOSPC || err == EFBIG) {
    struct statvfs vfs {};
    std::string free_text = "unknown";
    if (statvfs(kShmDir, &vfs) == 0) {
      const uint64_t free = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
      const uint64_t size = static_cast<uint64_t>(vfs.f_blocks) * vfs.f_frsize;
      free_text = std::to_string(free) + " bytes (" + mib(free) + ") free of " + mib(size);
    }
    throw ShmSpaceError("/dev/shm cannot hold the shared-memory segment of " + std::to_string(spec.global_ranks.size()) +
                        " ranks: it needs " + std::to_string(total) + " bytes (" + mib(total) + "), " + kShmDir +
                        " has " + free_text + " (" + errno_text(err) +
                        "). Remedies: a larger /dev/shm (docker run --shm-size=1g, or a Kubernetes emptyDir with "
                        "medium: Memory), smaller rings (ALLTOALL_SHM_RING_BYTES, at least 4096), or "
                        "ALLTOALL_TRANSPORT=c10d");
  }
  throw ShmError("cannot reserve " + std::to_string(total) + " bytes for shared-memory segment " + spec.name + ": " +
                 errno_text(err));
}

}  // namespace

ShmSegment::ShmSegment(const SegmentSpec& spec, int fd, uint8_t* base, size_t mapped, size_t header_bytes)
    : name_(spec.name),
      fd_(fd),
      base_(base),
      mapped_(mapped),
      header_bytes_(header_bytes),
      payload_bytes_(mapped - header_bytes),
      rank_(spec.rank),
      global_ranks_(spec.global_ranks),
      timeout_(spec.timeout),
      abort_word_(&reinterpret_cast<Header*>(base)->abort_word) {}

ShmSegment::ShmSegment(ShmSegment&& other) noexcept
    : name_(std::move(other.name_)),
      fd_(other.fd_),
      base_(other.base_),
      mapped_(other.mapped_),
      header_bytes_(other.header_bytes_),
      payload_bytes_(other.payload_bytes_),
      rank_(other.rank_),
      global_ranks_(std::move(other.global_ranks_)),
      timeout_(other.timeout_),
      abort_word_(other.abort_word_) {
  other.fd_ = -1;
  other.base_ = nullptr;
  // A moved-from segment reads as healthy and maps nothing.
  static std::atomic<uint32_t> healthy{0};
  other.abort_word_ = &healthy;
}

ShmSegment::~ShmSegment() {
  if (base_ != nullptr) munmap(base_, mapped_);
  if (fd_ >= 0) close(fd_);  // also drops this member's lock
}

size_t ShmSegment::total_bytes(size_t members, size_t payload) {
  return header_bytes_for(members) + align_up(payload, 4096);
}

ShmSegment ShmSegment::create(const SegmentSpec& spec) {
  check_spec(spec);
  const size_t members = spec.global_ranks.size();
  const size_t header = header_bytes_for(members);
  const size_t total = total_bytes(members, spec.bytes);
  const int fd = shm_open(spec.name.c_str(), O_CREAT | O_EXCL | O_RDWR, S_IRUSR | S_IWUSR);
  if (fd < 0) {
    const int err = errno;
    throw ShmError("cannot create shared-memory segment " + spec.name + ": " + errno_text(err));
  }
  uint8_t* base = nullptr;
  try {
    // shm_open applies the umask; make the mode exactly 0600 whatever it is.
    if (fchmod(fd, S_IRUSR | S_IWUSR) != 0) {
      const int err = errno;
      throw ShmError("cannot set the mode of shared-memory segment " + spec.name + ": " + errno_text(err));
    }
    reserve(fd, total, spec);
    base = map(fd, total, spec.name);
  } catch (...) {
    close(fd);
    shm_unlink(spec.name.c_str());
    throw;
  }
  auto* h = reinterpret_cast<Header*>(base);
  h->layout_version = kLayoutVersion;
  h->members = static_cast<uint32_t>(members);
  h->payload_bytes = total - header;
  std::memset(h->token, 0, kTokenBytes);
  std::memcpy(h->token, spec.token.data(), spec.token.size());
  h->arrivals.store(0, std::memory_order_relaxed);
  h->abort_word.store(0, std::memory_order_relaxed);
  for (size_t i = 0; i < members; ++i) {
    ranks_table(base)[i] = spec.global_ranks[i];
    pids_table(base, members)[i] = 0;
  }
  // The file is fresh (fallocate zero-fills), so the abort slots are zero.
  ShmSegment segment(spec, fd, base, total, header);
  segment.lock_own_byte();
  h->magic.store(kMagic, std::memory_order_release);
  return segment;
}

ShmSegment ShmSegment::attach(const SegmentSpec& spec) {
  check_spec(spec);
  const size_t members = spec.global_ranks.size();
  const size_t header = header_bytes_for(members);
  const auto deadline = std::chrono::steady_clock::now() + spec.timeout;
  // The creator publishes the name only after it made and sized the file,
  // but a late or foreign publisher may not have: wait, bounded.
  int fd = -1;
  struct stat st {};
  for (;;) {
    if (fd < 0) fd = shm_open(spec.name.c_str(), O_RDWR | O_NOFOLLOW, 0);
    if (fd < 0 && errno != ENOENT) {
      const int err = errno;
      throw ShmError("cannot open shared-memory segment " + spec.name + ": " + errno_text(err));
    }
    if (fd >= 0 && fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) >= header) break;
    if (std::chrono::steady_clock::now() > deadline) {
      if (fd >= 0) close(fd);
      throw ShmError("shared-memory segment " + spec.name + " was not created by group rank 0 (global rank " +
                     std::to_string(spec.global_ranks[0]) + ") within " + std::to_string(spec.timeout.count()) +
                     " ms; if the group's ranks do not share /dev/shm, set ALLTOALL_TRANSPORT=c10d");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  // Only a file this user made private may be attached: one that another
  // user, or anyone through group or other bits, could have written is not
  // this job's, whatever its header says.
  if (st.st_uid != geteuid() || (st.st_mode & 07777) != (S_IRUSR | S_IWUSR)) {
    close(fd);
    std::ostringstream mode;
    mode << std::oct << (st.st_mode & 07777);
    throw ShmError("shared-memory segment " + spec.name + " is owned by uid " + std::to_string(st.st_uid) +
                   " with mode 0" + mode.str() + ", but this process (euid " + std::to_string(geteuid()) +
                   ") attaches only to its own user's segments of mode 0600: not attaching");
  }
  // The header alone first: the token and the membership are checked before
  // the rings are mapped.
  {
    uint8_t* head = nullptr;
    try {
      head = map(fd, header, spec.name);
    } catch (...) {
      close(fd);
      throw;
    }
    auto* h = reinterpret_cast<Header*>(head);
    std::string problem;
    while (h->magic.load(std::memory_order_acquire) != kMagic) {
      if (std::chrono::steady_clock::now() > deadline) {
        problem = "shared-memory segment " + spec.name + " was not initialised within " +
                  std::to_string(spec.timeout.count()) + " ms";
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (problem.empty() &&
        (h->layout_version != kLayoutVersion || std::strncmp(h->token, spec.token.c_str(), kTokenBytes) != 0)) {
      problem = "shared-memory segment " + spec.name +
                " belongs to another job (its job token differs from this process's): not attaching";
    }
    if (problem.empty() && h->members != members) {
      problem = "shared-memory segment " + spec.name + " has " + std::to_string(h->members) +
                " members but this process expected " + std::to_string(members);
    }
    if (problem.empty()) {
      std::vector<int> ranks(ranks_table(head), ranks_table(head) + members);
      if (ranks != spec.global_ranks) {
        problem = "shared-memory segment " + spec.name + " is for global ranks " + format_ranks(ranks) +
                  " but this process expected " + format_ranks(spec.global_ranks);
      }
    }
    if (problem.empty() && header + h->payload_bytes != static_cast<uint64_t>(st.st_size)) {
      problem = "shared-memory segment " + spec.name + " has " + std::to_string(st.st_size) +
                " bytes but its header describes " + std::to_string(header + h->payload_bytes);
    }
    munmap(head, header);
    if (!problem.empty()) {
      close(fd);
      throw ShmError(problem);
    }
  }
  uint8_t* base = nullptr;
  try {
    base = map(fd, static_cast<size_t>(st.st_size), spec.name);
  } catch (...) {
    close(fd);
    throw;
  }
  ShmSegment segment(spec, fd, base, static_cast<size_t>(st.st_size), header);
  segment.lock_own_byte();
  return segment;
}

void ShmSegment::lock_own_byte() const {
  struct flock lock {};
  lock.l_type = F_WRLCK;
  lock.l_whence = SEEK_SET;
  lock.l_start = rank_;
  lock.l_len = 1;
  if (fcntl(fd_, F_SETLK, &lock) != 0) {
    const int err = errno;
    throw ShmError("cannot lock member byte " + std::to_string(rank_) + " of shared-memory segment " + name_ +
                   " (is another process attached as the same rank?): " + errno_text(err));
  }
  pids_table(base_, global_ranks_.size())[rank_] = static_cast<int32_t>(getpid());
}

bool ShmSegment::alive(int rank) const {
  if (rank == rank_) return true;
  struct flock probe {};
  probe.l_type = F_WRLCK;
  probe.l_whence = SEEK_SET;
  probe.l_start = rank;
  probe.l_len = 1;
  if (fcntl(fd_, F_GETLK, &probe) != 0) return true;  // cannot tell: assume alive, the timeout still bounds
  return probe.l_type != F_UNLCK;
}

std::vector<int> ShmSegment::dead_members() const {
  std::vector<int> dead;
  for (int r = 0; r < size(); ++r) {
    if (!alive(r)) dead.push_back(r);
  }
  return dead;
}

void ShmSegment::unlink() const { unlink_name(name_); }

void ShmSegment::unlink_name(const std::string& name) { shm_unlink(name.c_str()); }

void ShmSegment::barrier(int round, const std::string& what) const {
  auto* h = reinterpret_cast<Header*>(base_);
  h->arrivals.fetch_add(1, std::memory_order_acq_rel);
  const uint64_t target = static_cast<uint64_t>(round) * global_ranks_.size();
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  auto next_check = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  while (h->arrivals.load(std::memory_order_acquire) < target) {
    if (aborted()) throw ShmAborted(what + ": " + abort_report(), abort_origin());
    const auto now = std::chrono::steady_clock::now();
    if (now > next_check) {
      next_check = now + std::chrono::milliseconds(200);
      // Only members that attached can have left: one that holds no lock
      // yet may simply not have been scheduled since the segment appeared.
      std::vector<int> dead;
      for (int r : dead_members()) {
        if (pid_of(r) != 0) dead.push_back(r);
      }
      if (!dead.empty()) {
        throw ShmPeerDied(what + ": group member(s) " + format_ranks(dead) + " of segment " + name_ + " exited");
      }
    }
    if (now > deadline) {
      throw ShmError(what + ": not every member of segment " + name_ + " arrived within " +
                     std::to_string(timeout_.count()) + " ms");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

AbortSlot* ShmSegment::slot(int rank) const {
  return reinterpret_cast<AbortSlot*>(base_ + slots_offset(global_ranks_.size())) + rank;
}

void ShmSegment::mark_aborted(const std::string& message, int cause) const noexcept {
  AbortSlot* mine = slot(rank_);
  uint32_t expected = 0;
  if (mine->state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
    mine->cause = cause;
    const size_t n = std::min(message.size(), sizeof(mine->message) - 1);
    std::memcpy(mine->message, message.data(), n);
    mine->message[n] = '\0';
    mine->state.store(2, std::memory_order_release);
  }
  // seq_cst: a peer that reads its counters after this store, or whose
  // sleep flag this rank's doorbell ring then reads, sees the word.
  abort_word_->store(1, std::memory_order_seq_cst);
}

int ShmSegment::abort_origin() const {
  int any = -1;
  for (int r = 0; r < size(); ++r) {
    const AbortSlot* s = slot(r);
    if (s->state.load(std::memory_order_acquire) != 2) continue;
    if (s->cause < 0) return r;
    if (any < 0) any = r;
  }
  return any;
}

std::string ShmSegment::abort_report() const {
  // A slot being written (state 1) is finished within microseconds.
  for (int spin = 0; spin < 1000; ++spin) {
    bool writing = false;
    for (int r = 0; r < size(); ++r) writing = writing || slot(r)->state.load(std::memory_order_acquire) == 1;
    if (!writing) break;
    std::this_thread::yield();
  }
  std::vector<int> shown;
  for (int r = 0; r < size(); ++r) {
    const AbortSlot* s = slot(r);
    if (s->state.load(std::memory_order_acquire) == 2 && s->cause < 0) shown.push_back(r);
  }
  if (shown.empty()) {
    for (int r = 0; r < size(); ++r) {
      if (slot(r)->state.load(std::memory_order_acquire) == 2) shown.push_back(r);
    }
  }
  if (shown.empty()) return "the shared-memory segment " + name_ + " was aborted";
  std::ostringstream out;
  for (size_t i = 0; i < shown.size(); ++i) {
    const int r = shown[i];
    const AbortSlot* s = slot(r);
    // Peer-written: bounded by the slot whatever it holds.
    const std::string message(s->message, strnlen(s->message, sizeof(s->message)));
    out << (i ? "; " : "") << "group rank " << r << " (global rank " << global_ranks_[r] << ") failed";
    if (s->cause >= 0 && s->cause < size()) out << " after group rank " << s->cause;
    out << ": " << message;
  }
  return out.str();
}

unsigned ShmSegment::mode() const {
  struct stat st {};
  if (fstat(fd_, &st) != 0) return 0;
  return st.st_mode & 0777;
}

int32_t ShmSegment::pid_of(int rank) const { return pids_table(base_, global_ranks_.size())[rank]; }

}  // namespace alltoall::transport
