#include <torch/python.h>

#include <chrono>
#include <memory>

#include "bindings/register.h"
#include "ops/exchanger.h"
#include "ops/group_gather.h"
#include "transport/transport.h"

namespace py = pybind11;

namespace alltoall::bindings {

namespace {

// An Exchanger or GroupGather may hold the last reference to a process group (after
// destroy_process_group). Gloo's destructor joins its worker threads, and a
// worker that is freeing a tensor created in Python needs the GIL: deleting
// with the GIL held deadlocks. torch's own ProcessGroup holder releases the
// GIL on destruction for the same reason. An Exchanger's last reference may
// also go from an autograd node freed on a thread without the GIL.
template <typename T>
struct DeleteWithoutGil {
  void operator()(T* object) const {
    if (PyGILState_Check()) {
      py::gil_scoped_release no_gil;
      std::default_delete<T>()(object);
    } else {
      std::default_delete<T>()(object);
    }
  }
};

}  // namespace

void register_exchanger(py::module_& m) {
  register_progress(m);
  // Shared: a CallPath and the autograd nodes of its calls hold it too.
  py::class_<ops::Exchanger, std::shared_ptr<ops::Exchanger>>(m, "Exchanger",
                                                              "Runs an ExchangePlan; transports[i] carries phase i.")
      .def(py::init([](plan::ExchangePlan plan, std::vector<std::shared_ptr<transport::Transport>> transports,
                       std::shared_ptr<ops::ProgressThread> progress) {
             return std::shared_ptr<ops::Exchanger>(
                 new ops::Exchanger(std::move(plan), std::move(transports), std::move(progress)),
                 DeleteWithoutGil<ops::Exchanger>());
           }),
           py::arg("plan"), py::arg("transports"), py::arg("progress") = nullptr)
      .def_property_readonly("plan", &ops::Exchanger::plan, py::return_value_policy::reference_internal)
      .def("traffic",
           [](const ops::Exchanger& ex) {
             std::vector<std::pair<uint64_t, uint64_t>> out;
             for (const auto& t : ex.traffic()) out.emplace_back(t.calls, t.bytes);
             return out;
           },
           "(calls, bytes sent to other ranks) of each phase so far")
      .def("all_to_all", &ops::Exchanger::all_to_all, py::arg("input"), py::call_guard<py::gil_scoped_release>())
      .def("all_to_all_v", &ops::Exchanger::all_to_all_v, py::arg("input"), py::arg("input_splits"),
           py::arg("output_splits") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("all_to_all_async", &ops::Exchanger::all_to_all_async, py::arg("input"),
           py::call_guard<py::gil_scoped_release>())
      .def("all_to_all_v_async", &ops::Exchanger::all_to_all_v_async, py::arg("input"), py::arg("input_splits"),
           py::arg("output_splits") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("progress", &ops::Exchanger::progress);

  py::class_<ops::GroupGather, std::unique_ptr<ops::GroupGather, DeleteWithoutGil<ops::GroupGather>>>(
      m, "GroupGather", "All-gather along dim 0 over one group's transport.")
      .def(py::init([](std::shared_ptr<transport::Transport> transport, const std::string& role,
                       std::shared_ptr<ops::ProgressThread> progress) {
             return ops::GroupGather(std::move(transport), role, std::move(progress));
           }),
           py::arg("transport"), py::arg("role"), py::arg("progress") = nullptr)
      .def_property_readonly("size", &ops::GroupGather::size)
      .def_property_readonly("rank", &ops::GroupGather::rank)
      .def("all_gather", &ops::GroupGather::all_gather, py::arg("input"), py::call_guard<py::gil_scoped_release>())
      .def("all_gather_after", &ops::GroupGather::all_gather_after, py::arg("prior"), py::arg("rows"),
           py::call_guard<py::gil_scoped_release>());
}

}  // namespace alltoall::bindings
