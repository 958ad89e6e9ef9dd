#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "transport/shm_protocol.h"
#include "transport/transport.h"

namespace alltoall::transport {

struct ShmTransportSpec {
  SegmentSpec segment;  // segment.bytes is computed from the protocol
  ProtocolOptions protocol;
  std::string group_name;  // for messages
  std::string host;        // for messages
  // Carries tensors that are not in host memory (CUDA tensors keep c10d and
  // NCCL). May be null: such tensors are then an error.
  std::shared_ptr<Transport> fallback;
};

// A transport over a shared-memory segment of the group's members, all on
// one host. Collective: every member calls it with the same segment name and
// token; group rank 0 creates the segment, the others attach, and once all
// are attached every member unlinks the name, so /dev/shm keeps nothing even
// if a process dies later. On failure during set-up the name is unlinked too.
std::shared_ptr<Transport> make_shm_transport(ShmTransportSpec spec);

}  // namespace alltoall::transport
