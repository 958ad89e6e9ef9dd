#include <torch/python.h>

#include <chrono>
#include <memory>

#include "bindings/register.h"
#include "ops/exchanger.h"
#include "ops/group_gather.h"
#include "transport/c10d_transport.h"

namespace py = pybind11;

namespace alltoall::bindings {

namespace {

std::chrono::milliseconds to_timeout(double seconds) {
  TORCH_CHECK_VALUE(seconds > 0, "timeout must be positive, got ", seconds, " s");
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

// groups[i] = (group_name, global ranks) of the communicator of phase i.
ops::Exchanger make_exchanger(plan::ExchangePlan plan, const std::vector<std::pair<std::string, std::vector<int>>>& groups,
                              double timeout_seconds) {
  const auto timeout = to_timeout(timeout_seconds);
  std::vector<std::shared_ptr<transport::Transport>> transports;
  for (const auto& [name, ranks] : groups) transports.push_back(transport::make_c10d_transport(name, ranks, timeout));
  return ops::Exchanger(std::move(plan), std::move(transports));
}

// An Exchanger or GroupGather may hold the last reference to a process group (after
// destroy_process_group). Gloo's destructor joins its worker threads, and a
// worker that is freeing a tensor created in Python needs the GIL: deleting
// with the GIL held deadlocks. torch's own ProcessGroup holder releases the
// GIL on destruction for the same reason.
template <typename T>
struct DeleteWithoutGil {
  void operator()(T* object) const {
    py::gil_scoped_release no_gil;
    std::default_delete<T>()(object);
  }
};

}  // namespace

void register_exchanger(py::module_& m) {
  py::class_<ops::Exchanger, std::unique_ptr<ops::Exchanger, DeleteWithoutGil<ops::Exchanger>>>(
      m, "Exchanger", "Runs an ExchangePlan over c10d process groups.")
      .def(py::init(&make_exchanger), py::arg("plan"), py::arg("groups"), py::arg("timeout_seconds"))
      .def_property_readonly("plan", &ops::Exchanger::plan, py::return_value_policy::reference_internal)
      .def("all_to_all", &ops::Exchanger::all_to_all, py::arg("input"), py::call_guard<py::gil_scoped_release>())
      .def("all_to_all_v", &ops::Exchanger::all_to_all_v, py::arg("input"), py::arg("input_splits"),
           py::arg("output_splits") = py::none(), py::call_guard<py::gil_scoped_release>());

  py::class_<ops::GroupGather, std::unique_ptr<ops::GroupGather, DeleteWithoutGil<ops::GroupGather>>>(
      m, "GroupGather", "All-gather along dim 0 over a c10d process group.")
      .def(py::init([](const std::string& name, std::vector<int> ranks, const std::string& role, double timeout) {
             return ops::GroupGather(transport::make_c10d_transport(name, std::move(ranks), to_timeout(timeout)), role);
           }),
           py::arg("group_name"), py::arg("global_ranks"), py::arg("role"), py::arg("timeout_seconds"))
      .def_property_readonly("size", &ops::GroupGather::size)
      .def_property_readonly("rank", &ops::GroupGather::rank)
      .def("all_gather", &ops::GroupGather::all_gather, py::arg("input"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace alltoall::bindings
