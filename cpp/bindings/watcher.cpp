// The recovery watcher. Its thread never holds the GIL: results reach Python through a
// CompletionQueue (an eventfd asyncio watches) or a blocking wait() that runs with the GIL released.
#include <pybind11/native_enum.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <future>

#include "convert.hpp"
#include "register.hpp"
#include "residency/recovery_watcher.hpp"

namespace py = pybind11;

namespace residency::bindings {

namespace {

Nanos timeout_ns(double seconds) {
  if (std::isnan(seconds) || seconds < 0) {
    throw InvalidArgument("timeout_s must be >= 0 seconds (inf waits without a deadline)");
  }
  if (std::isinf(seconds) || seconds >= 9.2e9) return kNever;
  return static_cast<Nanos>(std::llround(seconds * 1e9));
}

Nanos poll_ns(double seconds, const char* what) {
  if (!std::isfinite(seconds) || seconds <= 0) {
    throw InvalidArgument(std::string(what) + " must be a finite number of seconds > 0");
  }
  return static_cast<Nanos>(std::llround(seconds * 1e9));
}

WatchRequest make_request(std::shared_ptr<MemoryProbe> probe, int device_index,
                          const py::int_& free_before, const py::int_& expected_freed,
                          const py::int_& needed, double timeout_s) {
  WatchRequest r;
  r.probe = std::move(probe);
  r.device_index = device_index;
  r.free_before = to_bytes(free_before, "free_before");
  r.expected_freed = to_bytes(expected_freed, "expected_freed");
  r.needed = to_bytes(needed, "needed");
  r.timeout_ns = timeout_ns(timeout_s);
  return r;
}

const char* outcome_name(RecoveryOutcome o) {
  switch (o) {
    case RecoveryOutcome::Recovered:
      return "RECOVERED";
    case RecoveryOutcome::TimedOut:
      return "TIMED_OUT";
    case RecoveryOutcome::ProbeFailed:
      return "PROBE_FAILED";
    case RecoveryOutcome::Stopped:
      return "STOPPED";
  }
  return "?";
}

/// Python drops the last reference with the GIL held; the destructor joins the thread, which may be
/// inside a probe call for a moment, so let other Python threads run meanwhile.
struct ReleaseGilDeleter {
  void operator()(RecoveryWatcher* w) const {
    if (PyGILState_Check() != 0) {
      py::gil_scoped_release release;
      delete w;
    } else {
      delete w;
    }
  }
};
using WatcherHolder = std::unique_ptr<RecoveryWatcher, ReleaseGilDeleter>;

}  // namespace

void register_watcher(py::module_& m) {
  py::native_enum<RecoveryOutcome>(m, "RecoveryOutcome", "enum.Enum")
      .value("RECOVERED", RecoveryOutcome::Recovered)
      .value("TIMED_OUT", RecoveryOutcome::TimedOut)
      .value("PROBE_FAILED", RecoveryOutcome::ProbeFailed)
      .value("STOPPED", RecoveryOutcome::Stopped)
      .finalize();

  py::class_<RecoveryResult>(m, "RecoveryResult", "How a recovery watch completed.")
      .def_readonly("outcome", &RecoveryResult::outcome)
      .def_readonly("elapsed_s", &RecoveryResult::elapsed_s)
      .def_readonly("polls", &RecoveryResult::polls)
      .def_readonly("last_free_bytes", &RecoveryResult::last_free_bytes)
      .def_readonly("error", &RecoveryResult::error)
      .def_readonly("started_ns", &RecoveryResult::started_ns)
      .def_readonly("completed_ns", &RecoveryResult::completed_ns)
      .def("__repr__", [](const RecoveryResult& r) {
        std::string s = std::string("<RecoveryResult ") + outcome_name(r.outcome) +
                        " elapsed_s=" + std::to_string(r.elapsed_s) +
                        " polls=" + std::to_string(r.polls) +
                        " last_free_bytes=" + std::to_string(r.last_free_bytes);
        if (!r.error.empty()) s += " error=" + py::repr(py::str(r.error)).cast<std::string>();
        return s + ">";
      });

  py::class_<CompletionQueue, std::shared_ptr<CompletionQueue>>(
      m, "CompletionQueue",
      "Completed watches for one event loop: fd becomes readable, drain() takes the results.")
      .def(py::init<>())
      .def_property_readonly("fd", &CompletionQueue::fd)
      .def("drain", &CompletionQueue::drain, py::call_guard<py::gil_scoped_release>());

  py::class_<RecoveryWatcher, WatcherHolder>(m, "RecoveryWatcher",
                              "One thread that polls memory probes until freed memory is back.")
      .def(py::init([](double initial_poll_s, double max_poll_s, double growth) {
             return WatcherHolder(new RecoveryWatcher(PollSchedule{
                 poll_ns(initial_poll_s, "initial_poll_s"), growth, poll_ns(max_poll_s, "max_poll_s")}));
           }),
           py::kw_only(), py::arg("initial_poll_s") = 0.001, py::arg("max_poll_s") = 0.006,
           py::arg("growth") = 1.5)
      .def("start", &RecoveryWatcher::start, py::call_guard<py::gil_scoped_release>())
      .def("stop", &RecoveryWatcher::stop, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("running", &RecoveryWatcher::running)
      .def(
          "watch",
          [](RecoveryWatcher& w, std::shared_ptr<MemoryProbe> probe, int device_index,
             const py::int_& free_before, const py::int_& expected_freed, const py::int_& needed,
             double timeout_s, std::shared_ptr<CompletionQueue> queue) {
            WatchRequest r = make_request(std::move(probe), device_index, free_before,
                                          expected_freed, needed, timeout_s);
            py::gil_scoped_release release;
            return w.watch(std::move(r), std::move(queue));
          },
          py::arg("probe"), py::arg("device_index"), py::kw_only(), py::arg("free_before"),
          py::arg("expected_freed"), py::arg("needed"), py::arg("timeout_s"), py::arg("queue"),
          "Begins a watch whose result goes to `queue`; returns its id.")
      .def("cancel", &RecoveryWatcher::cancel, py::arg("watch_id"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "wait",
          [](RecoveryWatcher& w, std::shared_ptr<MemoryProbe> probe, int device_index,
             const py::int_& free_before, const py::int_& expected_freed, const py::int_& needed,
             double timeout_s) {
            WatchRequest r = make_request(std::move(probe), device_index, free_before,
                                          expected_freed, needed, timeout_s);
            auto sink = std::make_shared<PromiseSink>();
            auto done = sink->future();
            WatchId id = 0;
            {
              py::gil_scoped_release release;
              id = w.watch(std::move(r), sink);
            }
            // Wait without the GIL, surfacing Ctrl-C every 50 ms (signals need the GIL to run).
            while (true) {
              {
                py::gil_scoped_release release;
                if (done.wait_for(std::chrono::milliseconds(50)) == std::future_status::ready) {
                  return done.get();
                }
              }
              if (PyErr_CheckSignals() != 0) {
                {
                  py::gil_scoped_release release;
                  w.cancel(id);
                }
                throw py::error_already_set();
              }
            }
          },
          py::arg("probe"), py::arg("device_index"), py::kw_only(), py::arg("free_before"),
          py::arg("expected_freed"), py::arg("needed"), py::arg("timeout_s") = 5.0,
          "Blocks (GIL released) until the watch completes.")
      .def_property_readonly("pending", &RecoveryWatcher::pending)
      .def_property_readonly("queries", &RecoveryWatcher::queries)
      .def("thread_cpu_ns", &RecoveryWatcher::thread_cpu_ns)
      .def_property_readonly(
          "initial_poll_s",
          [](const RecoveryWatcher& w) { return static_cast<double>(w.schedule().initial_ns) / 1e9; })
      .def_property_readonly(
          "max_poll_s",
          [](const RecoveryWatcher& w) { return static_cast<double>(w.schedule().max_ns) / 1e9; })
      .def_property_readonly("growth",
                             [](const RecoveryWatcher& w) { return w.schedule().growth; });
}

}  // namespace residency::bindings
