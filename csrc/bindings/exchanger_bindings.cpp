#include <torch/python.h>

#include <chrono>

#include "bindings/register.h"
#include "ops/exchanger.h"
#include "transport/c10d_transport.h"

namespace py = pybind11;

namespace alltoall::bindings {

namespace {

// groups[i] = (group_name, global ranks) of the communicator of phase i.
ops::Exchanger make_exchanger(plan::ExchangePlan plan, const std::vector<std::pair<std::string, std::vector<int>>>& groups,
                              double timeout_seconds) {
  TORCH_CHECK_VALUE(timeout_seconds > 0, "timeout must be positive, got ", timeout_seconds, " s");
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000.0));
  std::vector<std::shared_ptr<transport::Transport>> transports;
  for (const auto& [name, ranks] : groups) transports.push_back(transport::make_c10d_transport(name, ranks, timeout));
  return ops::Exchanger(std::move(plan), std::move(transports));
}

}  // namespace

void register_exchanger(py::module_& m) {
  // The last reference to a process group may be ours (after
  // destroy_process_group); its destructor joins gloo's worker threads, which
  // may need the GIL to free Python-owned tensors of finished work. Holding
  // the GIL here would deadlock (or std::terminate at interpreter exit).
  py::class_<ops::Exchanger>(m, "Exchanger", "Runs an ExchangePlan over c10d process groups.",
                             py::release_gil_before_calling_cpp_dtor())
      .def(py::init(&make_exchanger), py::arg("plan"), py::arg("groups"), py::arg("timeout_seconds"))
      .def_property_readonly("plan", &ops::Exchanger::plan, py::return_value_policy::reference_internal)
      .def("all_to_all", &ops::Exchanger::all_to_all, py::arg("input"), py::call_guard<py::gil_scoped_release>())
      .def("all_to_all_v", &ops::Exchanger::all_to_all_v, py::arg("input"), py::arg("input_splits"),
           py::arg("output_splits") = py::none(), py::call_guard<py::gil_scoped_release>());
}

}  // namespace alltoall::bindings
