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
//
// Group rank 0 creates the segment first (create_shm_segment, which raises
// ShmSpaceError when /dev/shm cannot hold it) and only then publishes its
// name, so no other process can take the name first; it passes the segment
// here as `created`.
std::shared_ptr<Transport> make_shm_transport(ShmTransportSpec spec, ShmSegment* created = nullptr);

// Group rank 0's segment for `spec` (its bytes computed from the protocol).
ShmSegment create_shm_segment(ShmTransportSpec spec);

// Test hook (ShmProtocol::test_poke) on a shared-memory transport.
void shm_test_poke(Transport& transport, const std::string& field, int peer, const std::vector<uint64_t>& values);

}  // namespace alltoall::transport
