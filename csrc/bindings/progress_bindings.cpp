// The progress thread and its work handles (alltoall.ops.work wraps them).
#include <torch/python.h>

#include <memory>

#include "bindings/register.h"
#include "ops/progress_thread.h"

namespace py = pybind11;

namespace alltoall::bindings {

namespace {

// Destroying a ProgressThread waits for its queued exchanges, which never
// need the GIL: release it when this thread holds it (the last reference
// may also go from an Exchanger's destructor, which already released it).
struct DeleteProgressThread {
  void operator()(ops::ProgressThread* progress) const {
    if (PyGILState_Check()) {
      py::gil_scoped_release no_gil;
      delete progress;
    } else {
      delete progress;
    }
  }
};

py::object result_to_python(ops::ExchangeResult result) {
  return py::make_tuple(std::move(result.output), std::move(result.splits));
}

}  // namespace

void register_progress(py::module_& m) {
  py::class_<ops::ProgressThread, std::shared_ptr<ops::ProgressThread>>(
      m, "ProgressThread", "One FIFO worker: a Communicator's exchanges run on it in issue order.")
      .def(py::init([](const std::string& name) {
             return std::shared_ptr<ops::ProgressThread>(new ops::ProgressThread(name), DeleteProgressThread{});
           }),
           py::arg("name"))
      .def("synchronize", &ops::ProgressThread::synchronize, py::call_guard<py::gil_scoped_release>(),
           "Waits until every queued exchange has run.")
      .def_property_readonly("in_flight", &ops::ProgressThread::in_flight)
      .def_property_readonly("started", &ops::ProgressThread::started);

  py::class_<ops::Work, std::shared_ptr<ops::Work>>(m, "Work", "A queued exchange.")
      // Both release the finished task's inputs here, on the owner's thread
      // (with the GIL: a captured tensor may own a Python object).
      .def("is_completed",
           [](ops::Work& work) {
             const bool done = work.is_completed();
             if (done) work.take_spent();
             return done;
           })
      .def(
          "wait",
          [](ops::Work& work) {
            ops::ExchangeResult result;
            std::exception_ptr error;
            {
              py::gil_scoped_release no_gil;
              try {
                result = work.wait();
              } catch (...) {
                error = std::current_exception();
              }
            }
            work.take_spent();
            if (error) std::rethrow_exception(error);
            return result_to_python(std::move(result));
          },
          "Blocks until the exchange ran; returns (output, splits) or raises its error.")
      .def_property_readonly("label", &ops::Work::label)
      .def_property_readonly("span_us", &ops::Work::span_us);
}

}  // namespace alltoall::bindings
