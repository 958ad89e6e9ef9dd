// c10's distributed errors as torch.distributed's Python classes. pybind11
// alone would turn every c10::Error into a plain RuntimeError, and callers
// that handle DistBackendError (a RuntimeError subclass) would miss ours.
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>

#include "bindings/register.h"

namespace py = pybind11;

namespace alltoall::bindings {

namespace {

void raise_as(const char* name, const c10::Error& error) {
  py::object cls = py::module_::import("torch.distributed").attr(name);
  PyErr_SetString(cls.ptr(), error.what_without_backtrace());
}

}  // namespace

void register_error_translation(py::module_&) {
  py::register_local_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const c10::DistNetworkError& error) {
      raise_as("DistNetworkError", error);
    } catch (const c10::DistStoreError& error) {
      raise_as("DistStoreError", error);
    } catch (const c10::DistBackendError& error) {
      raise_as("DistBackendError", error);
    } catch (const c10::DistError& error) {
      raise_as("DistError", error);
    }
  });
}

}  // namespace alltoall::bindings
