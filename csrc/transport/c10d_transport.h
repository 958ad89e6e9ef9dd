#pragma once

#include <c10/util/intrusive_ptr.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "transport/transport.h"

namespace c10d {
class Backend;
}  // namespace c10d

namespace alltoall::transport {

// A transport over the ProcessGroup registered as `group_name` (Python's
// group.group_name). `global_ranks` are the group's members, for messages.
// Every wait is bounded by `timeout`.
std::shared_ptr<Transport> make_c10d_transport(const std::string& group_name, std::vector<int> global_ranks,
                                               std::chrono::milliseconds timeout);

// The same over a c10d Backend that no ProcessGroup holds: the inner backends
// of the "alltoall" torch.distributed backend, which must not go through a
// registered group (that would call the alltoall backend itself). `name`
// names the group in messages.
std::shared_ptr<Transport> make_backend_transport(c10::intrusive_ptr<c10d::Backend> backend, const std::string& name,
                                                  std::vector<int> global_ranks, std::chrono::milliseconds timeout);

}  // namespace alltoall::transport
