// The "alltoall" c10d backend as a Python class deriving from torch's
// Backend, so torch.distributed can register it for a process group.
// alltoall/backend/ builds it (alltoall.backend.creation).
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/python.h>

#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "backend/alltoall_backend.h"
#include "bindings/register.h"
#include "bindings/timeout.h"
#include "ops/exchanger.h"
#include "plan/exchange_plan.h"
#include "transport/transport.h"

namespace py = pybind11;

namespace alltoall::bindings {

namespace {

using backend::AlltoallBackend;
using Plans = std::map<std::string, std::tuple<plan::ExchangePlan, std::vector<std::shared_ptr<transport::Transport>>>>;

c10::DeviceType parse_device(const std::string& name) {
  if (name == "cpu") return c10::kCPU;
  if (name == "cuda") return c10::kCUDA;
  TORCH_CHECK_VALUE(false, "device '", name, "' is not served by the alltoall backend (cpu or cuda)");
}

py::dict traffic_dict(const backend::Traffic& t) {
  py::dict d;
  d["calls"] = t.calls;
  d["bytes"] = t.bytes;
  return d;
}

py::dict stats_dict(const backend::BackendStats& stats) {
  py::dict algorithms;
  for (const auto& [name, alg] : stats.algorithms) {
    py::list phases;
    for (const auto& phase : alg.phases) {
      py::dict d = traffic_dict(phase.traffic);
      d["device"] = phase.device;
      d["role"] = phase.role;
      d["transport"] = phase.transport;
      phases.append(d);
    }
    py::dict entry = traffic_dict(alg.calls);
    entry["phases"] = phases;
    algorithms[py::str(name)] = entry;
  }
  py::dict transports;
  for (const auto& [kind, traffic] : stats.transports) transports[py::str(kind)] = traffic_dict(traffic);
  py::dict out;
  out["algorithms"] = algorithms;
  out["transports"] = transports;
  out["forwarded"] = stats.forwarded;
  return out;
}

}  // namespace

void register_backend(py::module_& m) {
  // torch.distributed must be imported first: it registers c10d's Backend.
  py::class_<AlltoallBackend, c10d::Backend, c10::intrusive_ptr<AlltoallBackend>>(
      m, "AlltoallBackend", "The alltoall c10d backend of one process group (built by alltoall.backend).")
      .def(py::init([](int rank, int size, const std::string& group_name, double timeout_seconds,
                       int64_t equal_hierarchical_up_to, bool uneven_hierarchical) {
             return c10::make_intrusive<AlltoallBackend>(rank, size, group_name, to_timeout(timeout_seconds),
                                                         backend::Policy{equal_hierarchical_up_to, uneven_hierarchical});
           }),
           py::arg("rank"), py::arg("size"), py::arg("group_name"), py::arg("timeout_seconds"),
           py::arg("equal_hierarchical_up_to"), py::arg("uneven_hierarchical"))
      .def(
          "add_device",
          [](AlltoallBackend& self, const std::string& device, c10::intrusive_ptr<c10d::Backend> inner,
             std::vector<c10::intrusive_ptr<c10d::Backend>> helpers, Plans plans) {
            std::map<std::string, std::unique_ptr<ops::Exchanger>> exchangers;
            for (auto& [name, entry] : plans) {
              exchangers[name] =
                  std::make_unique<ops::Exchanger>(std::move(std::get<0>(entry)), std::move(std::get<1>(entry)));
            }
            self.add_device(parse_device(device), std::move(inner), std::move(helpers), std::move(exchangers));
          },
          py::arg("device"), py::arg("inner"), py::arg("helpers"), py::arg("plans"),
          "Serve `device` tensors: `inner` forwards every other collective; plans maps an algorithm to "
          "(ExchangePlan, transports per phase).")
      .def("stats", [](const AlltoallBackend& self) { return stats_dict(self.stats()); })
      .def_property_readonly("equal_hierarchical_up_to",
                             [](const AlltoallBackend& self) { return self.policy().equal_hierarchical_up_to; })
      .def_property_readonly("uneven_hierarchical",
                             [](const AlltoallBackend& self) { return self.policy().uneven_hierarchical; })
      .def("describe", &AlltoallBackend::describe);
}

}  // namespace alltoall::bindings
