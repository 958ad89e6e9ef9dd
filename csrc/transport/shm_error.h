// Errors of the shared-memory transport's torch-free layers. The transport
// (shm_transport.cpp) adds the step and the group and rethrows as c10::Error.
#pragma once

#include <stdexcept>
#include <string>

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

}  // namespace alltoall::transport
