#include "transport/shm_segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

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
constexpr uint32_t kLayoutVersion = 1;
constexpr size_t kTokenBytes = 64;
constexpr size_t kMaxMembers = 4096;

// The first bytes of every segment. `magic` is written last by the creator
// (release), so an attacher that sees it sees the rest.
struct Header {
  std::atomic<uint64_t> magic;
  uint32_t layout_version;
  uint32_t members;
  uint64_t payload_bytes;
  char token[kTokenBytes];
  std::atomic<uint64_t> arrivals;  // barrier() counts here
  // then: int32_t global_ranks[members]; int32_t pids[members]
};

size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

size_t header_bytes_for(size_t members) {
  return align_up(sizeof(Header) + 2 * members * sizeof(int32_t), 4096);
}

int32_t* ranks_table(uint8_t* base) { return reinterpret_cast<int32_t*>(base + sizeof(Header)); }
int32_t* pids_table(uint8_t* base, size_t members) { return ranks_table(base) + members; }

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

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
      timeout_(spec.timeout) {}

ShmSegment::ShmSegment(ShmSegment&& other) noexcept
    : name_(std::move(other.name_)),
      fd_(other.fd_),
      base_(other.base_),
      mapped_(other.mapped_),
      header_bytes_(other.header_bytes_),
      payload_bytes_(other.payload_bytes_),
      rank_(other.rank_),
      global_ranks_(std::move(other.global_ranks_)),
      timeout_(other.timeout_) {
  other.fd_ = -1;
  other.base_ = nullptr;
}

ShmSegment::~ShmSegment() {
  if (base_ != nullptr) munmap(base_, mapped_);
  if (fd_ >= 0) close(fd_);  // also drops this member's lock
}

ShmSegment ShmSegment::create(const SegmentSpec& spec) {
  check_spec(spec);
  const size_t members = spec.global_ranks.size();
  const size_t header = header_bytes_for(members);
  const size_t total = header + align_up(spec.bytes, 4096);
  const int fd = shm_open(spec.name.c_str(), O_CREAT | O_EXCL | O_RDWR, S_IRUSR | S_IWUSR);
  if (fd < 0) {
    const int err = errno;
    throw ShmError("cannot create shared-memory segment " + spec.name + ": " + errno_text(err));
  }
  // shm_open applies the umask; make the mode exactly 0600 whatever it is.
  if (fchmod(fd, S_IRUSR | S_IWUSR) != 0 || ftruncate(fd, static_cast<off_t>(total)) != 0) {
    const int err = errno;
    close(fd);
    shm_unlink(spec.name.c_str());
    throw ShmError("cannot size shared-memory segment " + spec.name + " to " + std::to_string(total) +
                   " bytes: " + errno_text(err));
  }
  uint8_t* base = nullptr;
  try {
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
  for (size_t i = 0; i < members; ++i) {
    ranks_table(base)[i] = spec.global_ranks[i];
    pids_table(base, members)[i] = 0;
  }
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
  // The creator may not have made the file yet, or not sized it: wait for
  // both, bounded by the timeout.
  int fd = -1;
  struct stat st {};
  for (;;) {
    if (fd < 0) fd = shm_open(spec.name.c_str(), O_RDWR, 0);
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
  uint8_t* base = map(fd, static_cast<size_t>(st.st_size), spec.name);
  ShmSegment segment(spec, fd, base, static_cast<size_t>(st.st_size), header);
  auto* h = reinterpret_cast<Header*>(base);
  while (h->magic.load(std::memory_order_acquire) != kMagic) {
    if (std::chrono::steady_clock::now() > deadline) {
      throw ShmError("shared-memory segment " + spec.name + " was not initialised within " +
                     std::to_string(spec.timeout.count()) + " ms");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  if (h->layout_version != kLayoutVersion || std::strncmp(h->token, spec.token.c_str(), kTokenBytes) != 0) {
    throw ShmError("shared-memory segment " + spec.name +
                   " belongs to another job (its job token differs from this process's): not attaching");
  }
  std::vector<int> ranks(ranks_table(base), ranks_table(base) + h->members);
  if (ranks != spec.global_ranks) {
    throw ShmError("shared-memory segment " + spec.name + " is for global ranks " + format_ranks(ranks) +
                   " but this process expected " + format_ranks(spec.global_ranks));
  }
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
        throw ShmError(what + ": group member(s) " + format_ranks(dead) + " of segment " + name_ + " exited");
      }
    }
    if (now > deadline) {
      throw ShmError(what + ": not every member of segment " + name_ + " arrived within " +
                     std::to_string(timeout_.count()) + " ms");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

unsigned ShmSegment::mode() const {
  struct stat st {};
  if (fstat(fd_, &st) != 0) return 0;
  return st.st_mode & 0777;
}

int32_t ShmSegment::pid_of(int rank) const { return pids_table(base_, global_ranks_.size())[rank]; }

}  // namespace alltoall::transport
