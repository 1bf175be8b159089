#include "residency/engine.hpp"

#include <pybind11/native_enum.h>
#include <pybind11/stl.h>

#include "convert.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace residency::bindings {

namespace {

LoadShape make_shape(std::uint32_t ctx, std::uint32_t parallel, std::string kv_type,
                     std::optional<std::int32_t> gpu_layers) {
  return LoadShape{ctx, parallel, std::move(kv_type), gpu_layers};
}

std::unique_ptr<Engine> make_engine(std::vector<DeviceSpec> devices, const std::string& policy,
                                    const std::string& queue, std::uint32_t max_queue,
                                    Nanos starvation_ns, bool journal, Nanos queue_timeout_ns,
                                    std::uint32_t max_loads) {
  EngineOptions options{discipline_from(queue), max_queue,       starvation_ns,
                        journal,                queue_timeout_ns, max_loads};
  return std::make_unique<Engine>(std::move(devices), make_policy(policy), options);
}

}  // namespace

void register_engine(py::module_& m) {
  py::native_enum<Discipline>(m, "Discipline", "enum.Enum")
      .value("OLLAMA", Discipline::Ollama)
      .value("AFFINITY", Discipline::Affinity)
      .finalize();
  py::native_enum<ActionKind>(m, "ActionKind", "enum.Enum")
      .value("GRANT", ActionKind::Grant)
      .value("LOAD", ActionKind::Load)
      .value("STOP", ActionKind::Stop)
      .value("ESTIMATE", ActionKind::Estimate)
      .value("REJECT", ActionKind::Reject)
      .value("PREFETCH", ActionKind::Prefetch)
      .finalize();
  py::native_enum<StopCause>(m, "StopCause", "enum.Enum")
      .value("NONE", StopCause::None)
      .value("MAKE_ROOM", StopCause::MakeRoom)
      .value("RELOAD", StopCause::Reload)
      .value("EXPIRED", StopCause::Expired)
      .value("UNLOAD", StopCause::Unload)
      .value("FAILED", StopCause::Failed)
      .finalize();
  py::native_enum<RejectCode>(m, "RejectCode", "enum.Enum")
      .value("NONE", RejectCode::None)
      .value("TOO_LARGE", RejectCode::TooLarge)
      .value("BUSY", RejectCode::Busy)
      .value("FAILED", RejectCode::Failed)
      .value("TIMED_OUT", RejectCode::TimedOut)
      .finalize();

  py::class_<LoadShape>(m, "LoadShape", "The options that decide a runner's memory.")
      .def(py::init(&make_shape), py::arg("ctx"), py::arg("parallel") = 1,
           py::arg("kv_type") = "f16", py::arg("gpu_layers") = py::none())
      .def_readonly("ctx", &LoadShape::ctx)
      .def_readonly("parallel", &LoadShape::parallel)
      .def_readonly("kv_type", &LoadShape::kv_type)
      .def_readonly("gpu_layers", &LoadShape::gpu_layers)
      .def("satisfies", &LoadShape::satisfies, py::arg("want"));

  py::class_<Action>(m, "Action", "What the engine tells its driver to do.")
      .def_readonly("kind", &Action::kind)
      .def_readonly("request", &Action::request)
      .def_readonly("key", &Action::key)
      .def_readonly("device", &Action::device)
      .def_readonly("victims", &Action::victims)
      .def_readonly("freed_bytes", &Action::freed_bytes)
      .def_readonly("bytes", &Action::bytes)
      .def_readonly("joined_load", &Action::joined_load)
      .def_readonly("idle_for", &Action::idle_for)
      .def_readonly("evicted", &Action::evicted)
      .def_readonly("cause", &Action::cause)
      .def_readonly("code", &Action::code)
      .def_readonly("reason", &Action::reason)
      .def("__repr__", [](const Action& a) { return "<Action " + describe(a) + ">"; });

  // Arguments are converted with the GIL held; every call that takes the engine's lock releases it.
  using GilFree = py::call_guard<py::gil_scoped_release>;
  py::class_<Engine>(m, "Engine", "The request queue and every admission decision (sans-IO).")
      .def(py::init(&make_engine), py::arg("devices"), py::arg("policy") = "ollama",
           py::arg("queue") = "affinity", py::arg("max_queue") = 512,
           py::arg("starvation_ns") = 0, py::arg("journal") = false,
           py::arg("queue_timeout_ns") = 0, py::arg("max_loads") = 0)
      .def(
          "arrive",
          [](Engine& e, std::uint64_t request, const std::string& key, const LoadShape& shape,
             const py::int_& bytes_needed, Nanos keep_alive, Nanos now) {
            const std::uint64_t bytes = to_bytes(bytes_needed, "bytes_needed");
            py::gil_scoped_release release;
            return e.arrive(request, key, shape, bytes, keep_alive, now);
          },
          py::arg("request"), py::arg("key"), py::arg("shape"), py::arg("bytes_needed"),
          py::arg("keep_alive"), py::arg("now"))
      .def(
          "sized",
          [](Engine& e, std::uint64_t request, const py::int_& bytes_needed, Nanos now) {
            const std::uint64_t bytes = to_bytes(bytes_needed, "bytes_needed");
            py::gil_scoped_release release;
            return e.sized(request, bytes, now);
          },
          py::arg("request"), py::arg("bytes_needed"), py::arg("now"))
      .def(
          "ready",
          [](Engine& e, const std::string& key, Nanos now, double load_seconds,
             const std::optional<py::int_>& measured_bytes) {
            std::optional<std::uint64_t> measured;
            if (measured_bytes) measured = to_bytes(*measured_bytes, "measured_bytes");
            py::gil_scoped_release release;
            return e.ready(key, now, load_seconds, measured);
          },
          py::arg("key"), py::arg("now"), py::arg("load_seconds"),
          py::arg("measured_bytes") = py::none())
      .def("done", &Engine::done, py::arg("request"), py::arg("now"),
           py::arg("keep_alive") = py::none(), GilFree())
      .def("cancel", &Engine::cancel, py::arg("request"), py::arg("now"), GilFree())
      .def("gone", &Engine::gone, py::arg("key"), py::arg("now"), GilFree())
      .def("failed", &Engine::failed, py::arg("key"), py::arg("reason"), py::arg("now"),
           GilFree())
      .def("unload", &Engine::unload, py::arg("key"), py::arg("now"), py::arg("fresh") = false,
           GilFree())
      .def("oldest_wait", &Engine::oldest_wait, py::arg("now"), GilFree())
      .def("tick", &Engine::tick, py::arg("now"), GilFree())
      .def("next_deadline", &Engine::next_deadline, GilFree())
      .def("shape", &Engine::shape, py::arg("key"), GilFree())
      .def("queued", &Engine::queued, GilFree())
      .def("loads_in_flight", &Engine::loads_in_flight, GilFree())
      .def("journal", &Engine::journal, GilFree())
      .def("blocked_head", &Engine::blocked_head, GilFree())
      .def_property_readonly("starvation_ns",
                             [](const Engine& e) {
                               py::gil_scoped_release release;
                               return e.starvation_deadline();
                             })
      .def_property_readonly("discipline", &Engine::discipline)
      .def_property_readonly("resident_set", &Engine::resident_set,
                             py::return_value_policy::reference_internal);

  m.attr("DEFAULT_STARVATION_NS") = kDefaultStarvation;
}

}  // namespace residency::bindings
