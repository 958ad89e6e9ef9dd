#pragma once

#include <c10/util/Exception.h>

#include <chrono>
#include <cstdint>

namespace alltoall::bindings {

inline std::chrono::milliseconds to_timeout(double seconds) {
  TORCH_CHECK_VALUE(seconds > 0, "timeout must be positive, got ", seconds, " s");
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

}  // namespace alltoall::bindings
