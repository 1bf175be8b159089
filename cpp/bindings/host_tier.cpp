#include "residency/host_tier.hpp"

#include <pybind11/native_enum.h>
#include <pybind11/stl.h>

#include "register.hpp"

namespace py = pybind11;

namespace residency::bindings {

void register_host_tier(py::module_& m) {
  using GilFree = py::call_guard<py::gil_scoped_release>;
  py::native_enum<HostActionKind>(m, "HostActionKind", "enum.Enum")
      .value("WARM", HostActionKind::Warm)
      .value("DROP", HostActionKind::Drop)
      .finalize();
  py::class_<HostAction>(m, "HostAction", "Warm or drop a model file in the host's page cache.")
      .def_readonly("kind", &HostAction::kind)
      .def_readonly("key", &HostAction::key)
      .def_readonly("bytes", &HostAction::bytes)
      .def_readonly("keep", &HostAction::keep)
      .def("__repr__", [](const HostAction& a) {
        return std::string("<HostAction ") + to_string(a.kind) + " " + a.key + " " +
               std::to_string(a.bytes) + (a.keep > 0 ? " keep " + std::to_string(a.keep) : "") +
               ">";
      });
  py::class_<HostTier>(m, "HostTier", "Which model files the host keeps warm (sans-IO).")
      .def(py::init<std::uint64_t, Nanos>(), py::arg("budget"), py::arg("half_life_ns"))
      .def("loaded", &HostTier::loaded, py::arg("key"), py::arg("bytes"), py::arg("now"),
           GilFree())
      .def("waiting", &HostTier::waiting, py::arg("key"), py::arg("bytes"), py::arg("now"),
           GilFree())
      .def("mapped", &HostTier::mapped, py::arg("key"), py::arg("is_mapped"), py::arg("now"),
           GilFree())
      .def("measured", &HostTier::measured, py::arg("key"), py::arg("warm_bytes"), py::arg("now"),
           GilFree())
      .def("kept", &HostTier::kept, py::arg("key"), GilFree())
      .def("kept_of", &HostTier::kept_of, py::arg("key"), GilFree())
      .def("warm_bytes", &HostTier::warm_bytes, py::arg("key"), GilFree())
      .def("frequency", &HostTier::frequency, py::arg("key"), py::arg("now"), GilFree())
      .def_property_readonly("kept_bytes", &HostTier::kept_bytes)
      .def_property_readonly("budget", &HostTier::budget);
}

}  // namespace residency::bindings
