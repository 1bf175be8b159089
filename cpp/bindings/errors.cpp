#include "residency/errors.hpp"

#include "register.hpp"

namespace py = pybind11;

namespace residency::bindings {

void register_errors(py::module_& m) {
  // Translators registered later are tried first, so bases come before the classes derived from them.
  auto base = py::register_exception<Error>(m, "ResidencyError", PyExc_Exception);
  py::register_exception<InvalidArgument>(m, "InvalidArgumentError", base.ptr());
  py::register_exception<UnknownModel>(m, "UnknownModelError", base.ptr());
  py::register_exception<UnknownDevice>(m, "UnknownDeviceError", base.ptr());
  auto invalid_state = py::register_exception<InvalidState>(m, "InvalidStateError", base.ptr());
  py::register_exception<ModelBusy>(m, "ModelBusyError", invalid_state.ptr());
  py::register_exception<NotAcquired>(m, "NotAcquiredError", invalid_state.ptr());
  py::register_exception<BudgetExceeded>(m, "BudgetExceededError", base.ptr());
}

}  // namespace residency::bindings
