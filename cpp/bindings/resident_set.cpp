#include "residency/resident_set.hpp"

#include <pybind11/native_enum.h>
#include <pybind11/stl.h>

#include "convert.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace residency::bindings {

namespace {

DeviceSpec make_device(std::string id, const py::int_& total_bytes, const py::int_& overhead_bytes,
                       std::uint32_t max_models) {
  return DeviceSpec{std::move(id), to_bytes(total_bytes, "total_bytes"),
                    to_bytes(overhead_bytes, "overhead_bytes"), max_models};
}

std::string reservation_repr(const Reservation& r) {
  return "<Reservation " + r.key + " on " + r.device + " " + to_string(r.state) + " " +
         std::to_string(r.bytes) + " bytes refcount=" + std::to_string(r.refcount) + ">";
}

}  // namespace

void register_resident_set(py::module_& m) {
  py::native_enum<AdmitOutcome>(m, "AdmitOutcome", "enum.Enum")
      .value("HIT", AdmitOutcome::Hit)
      .value("LOAD", AdmitOutcome::Load)
      .value("WAIT", AdmitOutcome::Wait)
      .value("TOO_LARGE", AdmitOutcome::TooLarge)
      .finalize();
  py::native_enum<ReservationState>(m, "ReservationState", "enum.Enum")
      .value("LOADING", ReservationState::Loading)
      .value("READY", ReservationState::Ready)
      .value("UNLOADING", ReservationState::Unloading)
      .finalize();

  py::class_<DeviceSpec>(m, "Device", "A GPU, or the host, that models can be loaded into.")
      .def(py::init(&make_device), py::arg("id"), py::arg("total_bytes"),
           py::arg("overhead_bytes") = py::int_(0), py::arg("max_models") = 3)
      .def_readonly("id", &DeviceSpec::id)
      .def_readonly("total_bytes", &DeviceSpec::total_bytes)
      .def_readonly("overhead_bytes", &DeviceSpec::overhead_bytes)
      .def_readonly("max_models", &DeviceSpec::max_models)
      .def("__repr__", [](const DeviceSpec& d) {
        return "Device(id=" + py::repr(py::str(d.id)).cast<std::string>() +
               ", total_bytes=" + std::to_string(d.total_bytes) +
               ", overhead_bytes=" + std::to_string(d.overhead_bytes) +
               ", max_models=" + std::to_string(d.max_models) + ")";
      });

  py::class_<DeviceUsage>(m, "DeviceUsage", "A device's accounting as the core sees it now.")
      .def_readonly("id", &DeviceUsage::id)
      .def_readonly("total_bytes", &DeviceUsage::total_bytes)
      .def_readonly("overhead_bytes", &DeviceUsage::overhead_bytes)
      .def_readonly("max_models", &DeviceUsage::max_models)
      .def_readonly("budget_bytes", &DeviceUsage::budget_bytes)
      .def_readonly("reserved_bytes", &DeviceUsage::reserved_bytes)
      .def_readonly("unloading_bytes", &DeviceUsage::unloading_bytes)
      .def_readonly("models", &DeviceUsage::models);

  py::class_<Reservation>(m, "Reservation", "The bytes promised to one resident model.")
      .def_readonly("key", &Reservation::key)
      .def_readonly("device", &Reservation::device)
      .def_readonly("state", &Reservation::state)
      .def_readonly("bytes", &Reservation::bytes)
      .def_readonly("estimated_bytes", &Reservation::estimated_bytes)
      .def_readonly("measured", &Reservation::measured)
      .def_readonly("refcount", &Reservation::refcount)
      .def_readonly("keep_alive", &Reservation::keep_alive)
      .def_readonly("admitted_at", &Reservation::admitted_at)
      .def_readonly("loaded_at", &Reservation::loaded_at)
      .def_readonly("last_used", &Reservation::last_used)
      .def_property_readonly("expires_at",
                             [](const Reservation& r) { return deadline(r.expires_at); })
      .def_readonly("load_seconds", &Reservation::load_seconds)
      .def_readonly("hits", &Reservation::hits)
      .def_readonly("pinned", &Reservation::pinned)
      .def("__repr__", &reservation_repr);

  py::class_<ModelStats>(m, "ModelStats", "What the core remembers of a model across residencies.")
      .def_readonly("requests", &ModelStats::requests)
      .def_readonly("loads", &ModelStats::loads)
      .def_readonly("last_load_seconds", &ModelStats::last_load_seconds)
      .def_readonly("last_bytes", &ModelStats::last_bytes)
      .def_readonly("last_used", &ModelStats::last_used)
      .def_readonly("host_warm_bytes", &ModelStats::host_warm_bytes);

  py::class_<AdmitDecision>(m, "AdmitDecision", "How a model becomes resident.")
      .def_readonly("outcome", &AdmitDecision::outcome)
      .def_property_readonly("device",
                             [](const AdmitDecision& d) -> std::optional<std::string> {
                               if (d.device.empty()) return std::nullopt;
                               return d.device;
                             })
      .def_readonly("victims", &AdmitDecision::victims)
      .def_readonly("freed_bytes", &AdmitDecision::freed_bytes)
      .def_readonly("reason", &AdmitDecision::reason)
      .def("__repr__", [](const AdmitDecision& d) {
        std::string s = std::string("<AdmitDecision ") + to_string(d.outcome);
        if (!d.device.empty()) s += " on " + d.device;
        if (!d.victims.empty()) s += " evicting " + std::to_string(d.victims.size());
        return s + ">";
      });

  // Arguments are converted with the GIL held (pybind11 does so before the body runs); every call
  // that takes the core's lock runs with the GIL released.
  py::class_<ResidentSet>(m, "ResidentSet",
                          "Which models are resident on which device, and what to evict.")
      .def(py::init([](std::vector<DeviceSpec> devices, const std::string& policy) {
             return std::make_unique<ResidentSet>(std::move(devices), make_policy(policy));
           }),
           py::arg("devices"), py::arg("policy") = "ollama")
      .def("add_device", &ResidentSet::add_device, py::arg("device"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "admit",
          [](ResidentSet& s, const std::string& key, const py::int_& bytes_needed, Nanos now,
             Nanos keep_alive) {
            const std::uint64_t bytes = to_bytes(bytes_needed, "bytes_needed");
            py::gil_scoped_release release;
            return s.admit(key, bytes, now, keep_alive);
          },
          py::arg("key"), py::arg("bytes_needed"), py::arg("now"), py::arg("keep_alive"))
      .def(
          "loaded",
          [](ResidentSet& s, const std::string& key, Nanos now, double load_seconds,
             const std::optional<py::int_>& measured_bytes) {
            std::optional<std::uint64_t> measured;
            if (measured_bytes) measured = to_bytes(*measured_bytes, "measured_bytes");
            py::gil_scoped_release release;
            s.loaded(key, now, load_seconds, measured);
          },
          py::arg("key"), py::arg("now"), py::arg("load_seconds"),
          py::arg("measured_bytes") = py::none())
      .def(
          "acquire",
          [](ResidentSet& s, const std::string& key, Nanos now) {
            py::gil_scoped_release release;
            s.acquire(key, now);
          },
          py::arg("key"), py::arg("now"))
      .def("release", &ResidentSet::release, py::arg("key"), py::arg("now"),
           py::arg("keep_alive") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("expired", &ResidentSet::expired, py::arg("now"),
           py::call_guard<py::gil_scoped_release>())
      .def("next_expiry", &ResidentSet::next_expiry, py::call_guard<py::gil_scoped_release>())
      .def("begin_unload", &ResidentSet::begin_unload, py::arg("key"), py::arg("force") = false,
           py::call_guard<py::gil_scoped_release>())
      .def("unloaded", &ResidentSet::unloaded, py::arg("key"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "update_measured_bytes",
          [](ResidentSet& s, const std::string& key, const py::int_& bytes) {
            const std::uint64_t b = to_bytes(bytes, "bytes");
            py::gil_scoped_release release;
            s.update_measured_bytes(key, b);
          },
          py::arg("key"), py::arg("bytes"))
      .def("set_pinned", &ResidentSet::set_pinned, py::arg("key"), py::arg("pinned"),
           py::arg("now"), py::call_guard<py::gil_scoped_release>())
      .def(
          "set_host_warm",
          [](ResidentSet& s, const std::string& key, const py::int_& bytes) {
            const std::uint64_t b = to_bytes(bytes, "bytes");
            py::gil_scoped_release release;
            s.set_host_warm(key, b);
          },
          py::arg("key"), py::arg("bytes"))
      .def("reservation", &ResidentSet::reservation, py::arg("key"),
           py::call_guard<py::gil_scoped_release>())
      .def("snapshot", &ResidentSet::snapshot, py::call_guard<py::gil_scoped_release>())
      .def("devices", &ResidentSet::devices, py::call_guard<py::gil_scoped_release>())
      .def("stats", &ResidentSet::stats, py::arg("key"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("policy", [](const ResidentSet& s) {
        py::gil_scoped_release release;
        return s.policy_name();
      });

  m.def("policy_names", &policy_names, "The eviction policies selectable by name.");
}

}  // namespace residency::bindings
