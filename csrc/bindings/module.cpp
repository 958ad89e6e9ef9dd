// Python bindings of alltoall._C: plans, the executor and build facts. The
// tensor kernels are torch ops (torch.ops.alltoall.*), registered in ops/.
#include <pybind11/pybind11.h>

#include "bindings/register.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "alltoall C++ extension: exchange plans, the plan executor, layout kernels, the c10d backend";
  alltoall::bindings::register_plan(m);
  alltoall::bindings::register_transport(m);
  alltoall::bindings::register_exchanger(m);
  alltoall::bindings::register_call_path(m);
  alltoall::bindings::register_build_info(m);
  alltoall::bindings::register_backend(m);
}
