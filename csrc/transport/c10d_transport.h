#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "transport/transport.h"

namespace alltoall::transport {

// A transport over the ProcessGroup registered as `group_name` (Python's
// group.group_name). `global_ranks` are the group's members, for messages.
// Every wait is bounded by `timeout`.
std::shared_ptr<Transport> make_c10d_transport(const std::string& group_name, std::vector<int> global_ranks,
                                               std::chrono::milliseconds timeout);

}  // namespace alltoall::transport
