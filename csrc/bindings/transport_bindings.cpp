// Transports as Python objects: alltoall.transport builds one per group and
// hands them to the executor (Exchanger) and the TP all-gather (GroupGather).
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/python.h>

#include <chrono>
#include <memory>

#include "bindings/register.h"
#include "bindings/timeout.h"
#include "transport/c10d_transport.h"
#include "transport/shm_error.h"
#include "transport/shm_segment.h"
#include "transport/shm_transport.h"

namespace py = pybind11;

namespace alltoall::bindings {

namespace {

using transport::Transport;

std::shared_ptr<Transport> make_shm(const std::string& name, const std::string& token, std::vector<int> global_ranks,
                                    int rank, double timeout_seconds, size_t ring_bytes, size_t single_copy_bytes,
                                    int spins, int yields, const std::string& group_name, const std::string& host,
                                    std::shared_ptr<Transport> fallback, transport::ShmSegment* created) {
  transport::ShmTransportSpec spec;
  spec.segment.name = name;
  spec.segment.token = token;
  spec.segment.global_ranks = std::move(global_ranks);
  spec.segment.rank = rank;
  spec.segment.timeout = to_timeout(timeout_seconds);
  spec.protocol.ring_bytes = ring_bytes;
  spec.protocol.single_copy_bytes = single_copy_bytes;
  spec.protocol.wait.spins = spins;
  spec.protocol.wait.yields = yields;
  spec.group_name = group_name;
  spec.host = host;
  spec.fallback = std::move(fallback);
  return transport::make_shm_transport(std::move(spec), created);
}

transport::SegmentSpec segment_spec(const std::string& name, const std::string& token, std::vector<int> ranks,
                                    int rank, size_t bytes, double timeout_seconds) {
  transport::SegmentSpec spec;
  spec.name = name;
  spec.token = token;
  spec.global_ranks = std::move(ranks);
  spec.rank = rank;
  spec.bytes = bytes;
  spec.timeout = to_timeout(timeout_seconds);
  return spec;
}

}  // namespace

void register_transport(py::module_& m) {
  py::class_<Transport, std::shared_ptr<Transport>>(m, "Transport", "Moves rows of dim 0 between a group's members.")
      .def_property_readonly("size", &Transport::size)
      .def_property_readonly("rank", &Transport::rank)
      .def_property_readonly("kind", &Transport::kind)
      .def("describe", &Transport::describe)
      .def(
          "all_to_all",
          [](Transport& t, at::Tensor output, at::Tensor input, const std::vector<int64_t>& output_splits,
             const std::vector<int64_t>& input_splits, const std::string& what) {
            t.all_to_all(output, input, output_splits, input_splits, what);
          },
          py::arg("output"), py::arg("input"), py::arg("output_splits") = std::vector<int64_t>{},
          py::arg("input_splits") = std::vector<int64_t>{}, py::arg("what") = "all_to_all",
          py::call_guard<py::gil_scoped_release>())
      .def(
          "all_gather",
          [](Transport& t, at::Tensor output, at::Tensor input, const std::string& what) {
            t.all_gather(output, input, what);
          },
          py::arg("output"), py::arg("input"), py::arg("what") = "all_gather", py::call_guard<py::gil_scoped_release>())
      .def(
          "abort", [](Transport& t, const std::string& reason) { t.abort(reason); }, py::arg("reason"),
          "Tells the group's other members that this rank failed (they raise, naming it) and makes every later "
          "call raise; shared memory only (c10d transports: no-op). Safe while an exchange runs on another thread.");

  m.def(
      "c10d_transport",
      [](const std::string& name, std::vector<int> ranks, double timeout_seconds) {
        return transport::make_c10d_transport(name, std::move(ranks), to_timeout(timeout_seconds));
      },
      py::arg("group_name"), py::arg("global_ranks"), py::arg("timeout_seconds"),
      "A transport over the c10d ProcessGroup registered as group_name.");

  m.def(
      "backend_transport",
      [](c10::intrusive_ptr<c10d::Backend> backend, const std::string& name, std::vector<int> ranks,
         double timeout_seconds) {
        return transport::make_backend_transport(std::move(backend), name, std::move(ranks),
                                                 to_timeout(timeout_seconds));
      },
      py::arg("backend"), py::arg("group_name"), py::arg("global_ranks"), py::arg("timeout_seconds"),
      "A transport over a c10d Backend object that no registered ProcessGroup holds (the alltoall backend's "
      "inner backends); group_name names it in messages.");

  m.def("shm_transport", &make_shm, py::arg("segment_name"), py::arg("token"), py::arg("global_ranks"),
        py::arg("rank"), py::arg("timeout_seconds"), py::arg("ring_bytes"), py::arg("single_copy_bytes"),
        py::arg("spins"), py::arg("yields"), py::arg("group_name"), py::arg("host"), py::arg("fallback") = nullptr,
        py::arg("created") = nullptr, py::call_guard<py::gil_scoped_release>(),
        "A shared-memory transport; collective over the members. Group rank 0 passes the segment it created "
        "with shm_create_segment (before publishing the name) as created.");

  m.def(
      "shm_create_segment",
      [](const std::string& name, const std::string& token, std::vector<int> ranks, double timeout_seconds,
         size_t ring_bytes) {
        transport::ShmTransportSpec spec;
        spec.segment = segment_spec(name, token, std::move(ranks), 0, 0, timeout_seconds);
        spec.protocol.ring_bytes = ring_bytes;
        return transport::create_shm_segment(std::move(spec));
      },
      py::arg("segment_name"), py::arg("token"), py::arg("global_ranks"), py::arg("timeout_seconds"),
      py::arg("ring_bytes"),
      "Group rank 0's segment, created and reserved before its name is published; ShmSpaceError when /dev/shm "
      "cannot hold it.");

  m.def(
      "shm_segment_bytes",
      [](int members, size_t ring_bytes) {
        return transport::ShmSegment::total_bytes(static_cast<size_t>(members),
                                                  transport::ShmProtocol::payload_bytes(members, ring_bytes));
      },
      py::arg("members"), py::arg("ring_bytes"), "Bytes of /dev/shm one group's segment takes.");

  m.def("shm_test_poke", &transport::shm_test_poke, py::arg("transport"), py::arg("field"), py::arg("peer"),
        py::arg("values"), "Test hook: writes impossible values into this rank's side of a shared-memory segment.");

  // The segment alone, for tests of its rendezvous and permissions.
  py::class_<transport::ShmSegment>(m, "ShmSegment", "A mapped shared-memory segment (tests).")
      .def_static(
          "create",
          [](const std::string& name, const std::string& token, std::vector<int> ranks, int rank, size_t bytes,
             double timeout) { return transport::ShmSegment::create(segment_spec(name, token, ranks, rank, bytes, timeout)); },
          py::arg("name"), py::arg("token"), py::arg("global_ranks"), py::arg("rank"), py::arg("bytes"),
          py::arg("timeout_seconds"))
      .def_static(
          "attach",
          [](const std::string& name, const std::string& token, std::vector<int> ranks, int rank, size_t bytes,
             double timeout) { return transport::ShmSegment::attach(segment_spec(name, token, ranks, rank, bytes, timeout)); },
          py::arg("name"), py::arg("token"), py::arg("global_ranks"), py::arg("rank"), py::arg("bytes"),
          py::arg("timeout_seconds"))
      .def_property_readonly("mode", &transport::ShmSegment::mode)
      .def_property_readonly("name", &transport::ShmSegment::name)
      .def("alive", &transport::ShmSegment::alive, py::arg("rank"))
      .def("unlink", &transport::ShmSegment::unlink)
      .def_property_readonly("aborted", &transport::ShmSegment::aborted)
      .def("abort_report", &transport::ShmSegment::abort_report)
      .def(
          "mark_aborted", [](const transport::ShmSegment& s, const std::string& m) { s.mark_aborted(m, -1); },
          py::arg("message"));

  auto shm_error = py::register_exception<transport::ShmError>(m, "ShmError", PyExc_RuntimeError);
  py::register_exception<transport::ShmSpaceError>(m, "ShmSpaceError", shm_error.ptr());
}

}  // namespace alltoall::bindings
