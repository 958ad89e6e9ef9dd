// Errors of the shared-memory transport's torch-free layers. The transport
// (shm_transport.cpp) adds the step and the group and rethrows as c10::Error.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace alltoall::transport {

class ShmError : public std::runtime_error {
 public:
  explicit ShmError(const std::string& what) : std::runtime_error(what) {}
};

// A peer that exited while this rank waited for it.
class ShmPeerDied : public ShmError {
 public:
  using ShmError::ShmError;
};

// Another member marked the segment's abort word: `origin` is its group rank.
class ShmAborted : public ShmError {
 public:
  ShmAborted(const std::string& what, int origin) : ShmError(what), origin(origin) {}
  int origin;
};

// /dev/shm cannot hold the segment (ENOSPC or EFBIG from posix_fallocate).
class ShmSpaceError : public ShmError {
 public:
  using ShmError::ShmError;
};

// "[a, b, c]", for the ranks in messages.
inline std::string format_ranks(const std::vector<int>& ranks) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < ranks.size(); ++i) out << (i ? ", " : "") << ranks[i];
  out << "]";
  return out.str();
}

}  // namespace alltoall::transport
