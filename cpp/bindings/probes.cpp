// Memory probes and the simulated device. Probes are C++ objects only (no Python subclasses), so the
// recovery watcher's thread can call them without ever needing the GIL.
#include <pybind11/native_enum.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <cmath>
#include <filesystem>

#include "convert.hpp"
#include "register.hpp"
#include "residency/memory_probe.hpp"
#include "residency/simulated_device.hpp"

namespace py = pybind11;

namespace residency::bindings {

namespace {

Nanos seconds_to_ns(double s, const char* what) {
  if (!std::isfinite(s) || s < 0) {
    throw InvalidArgument(std::string(what) + " must be a finite number of seconds >= 0");
  }
  return static_cast<Nanos>(std::llround(s * 1e9));
}

const char* lag_name(LagKind k) {
  switch (k) {
    case LagKind::Fixed:
      return "fixed";
    case LagKind::Random:
      return "random";
    case LagKind::Gradual:
      return "gradual";
    case LagKind::Never:
      return "never";
  }
  return "fixed";
}

/// lag_s is seconds (float) or a (low, high) range; `shape` picks how freed bytes come back.
/// No shape: a float is a fixed lag, a range a random one.
LagModel make_lag(const py::object& lag_s, const std::optional<std::string>& shape) {
  std::optional<std::pair<double, double>> range;
  double fixed = 0.0;
  if (py::isinstance<py::tuple>(lag_s) || py::isinstance<py::list>(lag_s)) {
    const auto seq = lag_s.cast<py::sequence>();
    if (py::len(seq) != 2) throw InvalidArgument("lag_s range must be (low, high)");
    range = {seq[0].cast<double>(), seq[1].cast<double>()};
  } else {
    fixed = lag_s.cast<double>();
  }
  const std::string kind = shape.value_or(range ? "random" : "fixed");
  LagModel lag;
  if (kind == "fixed") {
    if (range) throw InvalidArgument("a fixed lag takes one number of seconds, not a range");
    lag.kind = LagKind::Fixed;
    lag.min_ns = lag.max_ns = seconds_to_ns(fixed, "lag_s");
  } else if (kind == "random" || kind == "gradual") {
    lag.kind = kind == "random" ? LagKind::Random : LagKind::Gradual;
    if (!range) {
      if (kind == "random") throw InvalidArgument("a random lag takes a (low, high) range");
      range = {0.0, fixed};  // gradual over (0, lag_s)
    }
    lag.min_ns = seconds_to_ns(range->first, "lag_s low");
    lag.max_ns = seconds_to_ns(range->second, "lag_s high");
    if (lag.max_ns < lag.min_ns) throw InvalidArgument("lag_s range must have low <= high");
  } else if (kind == "never") {
    lag.kind = LagKind::Never;
  } else {
    throw InvalidArgument("unknown lag shape '" + kind +
                          "': expected fixed, random, gradual or never");
  }
  return lag;
}

py::object optional_ns(Nanos t) { return t == kNever ? py::none() : py::cast(t); }

}  // namespace

void register_probes(py::module_& m) {
  auto base = py::reinterpret_borrow<py::object>(m.attr("ResidencyError"));
  auto probe_error = py::register_exception<ProbeError>(m, "ProbeError", base.ptr());
  py::register_exception<ProbeUnavailable>(m, "ProbeUnavailableError", probe_error.ptr());
  py::register_exception<DeviceOutOfMemory>(m, "DeviceOutOfMemoryError", base.ptr());

  py::class_<MemoryInfo>(m, "MemoryInfo", "Free and total bytes a device reports.")
      .def(py::init([](const py::int_& free_bytes, const py::int_& total_bytes) {
             return MemoryInfo{to_bytes(free_bytes, "free_bytes"),
                               to_bytes(total_bytes, "total_bytes")};
           }),
           py::arg("free_bytes"), py::arg("total_bytes"))
      .def_readonly("free_bytes", &MemoryInfo::free_bytes)
      .def_readonly("total_bytes", &MemoryInfo::total_bytes)
      .def("__repr__", [](const MemoryInfo& i) {
        return "MemoryInfo(free_bytes=" + std::to_string(i.free_bytes) +
               ", total_bytes=" + std::to_string(i.total_bytes) + ")";
      });

  py::class_<MemoryProbe, std::shared_ptr<MemoryProbe>>(
      m, "MemoryProbe", "Free/total bytes of the devices one backend (cuda, nvml, host) sees.")
      .def_property_readonly("backend", &MemoryProbe::backend)
      .def("device_count", &MemoryProbe::device_count)
      .def("device_name", &MemoryProbe::device_name, py::arg("index"))
      .def("query", &MemoryProbe::query, py::arg("index"),
           py::call_guard<py::gil_scoped_release>())
      .def("__repr__", [](const MemoryProbe& p) {
        return "<MemoryProbe " + p.backend() + " devices=" + std::to_string(p.device_count()) +
               ">";
      });

  m.def("open_cuda_probe", &open_cuda_probe, py::arg("libraries"),
        "The CUDA runtime probe; the first library path that dlopen()s is used. Its first query "
        "of a device creates a CUDA context in this process.",
        py::call_guard<py::gil_scoped_release>());
  m.def("open_nvml_probe", &open_nvml_probe, py::arg("libraries"),
        "The NVML probe (no CUDA context); the first library path that dlopen()s is used.",
        py::call_guard<py::gil_scoped_release>());
  m.def("open_host_probe", &open_host_probe, py::arg("meminfo_path") = "/proc/meminfo",
        "The host's RAM as one device (MemTotal, MemAvailable).",
        py::call_guard<py::gil_scoped_release>());

  py::class_<SimAllocation>(m, "SimAllocation", "One allocation on a simulated device.")
      .def_readonly("handle", &SimAllocation::handle)
      .def_readonly("bytes", &SimAllocation::bytes)
      .def_readonly("owner_pid", &SimAllocation::owner_pid)
      .def_readonly("releasing", &SimAllocation::releasing)
      .def_property_readonly("release_start_ns",
                             [](const SimAllocation& a) { return optional_ns(a.release_start_ns); })
      .def_property_readonly("release_end_ns",
                             [](const SimAllocation& a) { return optional_ns(a.release_end_ns); })
      .def("__repr__", [](const SimAllocation& a) {
        return "<SimAllocation " + std::to_string(a.handle) + " " + std::to_string(a.bytes) +
               " bytes pid=" + std::to_string(a.owner_pid) + (a.releasing ? " releasing>" : ">");
      });

  py::class_<SimulatedDevice, MemoryProbe, std::shared_ptr<SimulatedDevice>>(
      m, "SimulatedDevice",
      "A scriptable device in a file shared across processes: freed bytes come back after a lag.")
      .def_static(
          "create",
          [](const std::filesystem::path& path, const py::int_& total_bytes,
             const py::object& lag_s, const std::optional<std::string>& lag, std::uint64_t seed) {
            const auto total = to_bytes(total_bytes, "total_bytes");
            const LagModel model = make_lag(lag_s, lag);
            py::gil_scoped_release release;
            return SimulatedDevice::create(path.string(), total, model, seed);
          },
          py::arg("path"), py::arg("total_bytes"), py::kw_only(), py::arg("lag_s") = 0.0,
          py::arg("lag") = py::none(), py::arg("seed") = 0,
          "Writes a fresh device to `path`. lag_s: seconds, or a (low, high) range; lag: 'fixed', "
          "'random' (uniform in the range), 'gradual' (linearly over the range) or 'never'.")
      .def_static(
          "open",
          [](const std::filesystem::path& path) {
            const std::string p = path.string();
            py::gil_scoped_release release;
            return SimulatedDevice::open(p);
          },
          py::arg("path"))
      .def(
          "allocate",
          [](SimulatedDevice& d, const py::int_& nbytes) {
            const auto b = to_bytes(nbytes, "nbytes");
            py::gil_scoped_release release;
            return d.allocate(b);
          },
          py::arg("nbytes"))
      .def("free", &SimulatedDevice::free, py::arg("handle"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "set_lag",
          [](SimulatedDevice& d, const py::object& lag_s, const std::optional<std::string>& lag) {
            const LagModel model = make_lag(lag_s, lag);
            py::gil_scoped_release release;
            d.set_lag(model);
          },
          py::arg("lag_s") = 0.0, py::arg("lag") = py::none())
      .def_property_readonly("lag",
                             [](const SimulatedDevice& d) {
                               LagModel l;
                               {
                                 py::gil_scoped_release release;
                                 l = d.lag();
                               }
                               return py::make_tuple(lag_name(l.kind),
                                                     static_cast<double>(l.min_ns) / 1e9,
                                                     static_cast<double>(l.max_ns) / 1e9);
                             })
      .def("fail_queries", &SimulatedDevice::fail_queries, py::arg("count") = 1,
           py::arg("message") = "injected probe failure",
           py::call_guard<py::gil_scoped_release>())
      .def("allocations", &SimulatedDevice::allocations, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("total_bytes", &SimulatedDevice::total_bytes)
      .def_property_readonly("queries", &SimulatedDevice::queries)
      .def_property_readonly("path", &SimulatedDevice::path);
}

}  // namespace residency::bindings
