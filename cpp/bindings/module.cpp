#include <pybind11/pybind11.h>

#include "register.hpp"

PYBIND11_MODULE(_core, m, pybind11::mod_gil_not_used()) {
  m.doc() = "residency's C++ core: the scheduling engine, the resident set, eviction policies and memory probes.";
  m.attr("__version__") = RESIDENCY_VERSION;
  residency::bindings::register_errors(m);
  residency::bindings::register_resident_set(m);
  residency::bindings::register_probes(m);
  residency::bindings::register_watcher(m);
  residency::bindings::register_engine(m);
}
