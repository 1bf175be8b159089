#pragma once
// One registration function per area; module.cpp calls them in order.

#include <pybind11/pybind11.h>

namespace residency::bindings {

void register_errors(pybind11::module_& m);
void register_resident_set(pybind11::module_& m);
void register_probes(pybind11::module_& m);
void register_watcher(pybind11::module_& m);
void register_engine(pybind11::module_& m);

}  // namespace residency::bindings
