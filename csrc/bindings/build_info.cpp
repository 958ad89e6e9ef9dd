#include <pybind11/pybind11.h>

#include "bindings/register.h"

#ifdef ALLTOALL_WITH_CUDA
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif

namespace py = pybind11;

namespace alltoall::bindings {

void register_build_info(py::module_& m) {
  m.def("build_info", []() {
    py::dict info;
    info["cpp"] = true;
#ifdef ALLTOALL_WITH_CUDA
    info["cuda"] = true;
    info["cuda_runtime"] = CUDART_VERSION;
    info["nccl_headers"] = py::make_tuple(NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH);
    int version = 0;
    if (ncclGetVersion(&version) == ncclSuccess) info["nccl_runtime"] = version;
#else
    info["cuda"] = false;
#endif
    return info;
  }, "What this build of the extension holds: C++ always, CUDA and the NCCL it was built with when present.");
}

}  // namespace alltoall::bindings
