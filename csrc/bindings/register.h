#pragma once

#include <pybind11/pybind11.h>

namespace alltoall::bindings {

void register_plan(pybind11::module_& m);
void register_transport(pybind11::module_& m);
void register_progress(pybind11::module_& m);
void register_exchanger(pybind11::module_& m);
void register_call_path(pybind11::module_& m);
void register_build_info(pybind11::module_& m);
void register_backend(pybind11::module_& m);

}  // namespace alltoall::bindings
