#pragma once
/// Exceptions the core raises. Every one leaves the state unchanged.

#include <stdexcept>
#include <string>

namespace residency {

/// Base of every error the core raises (bound as residency.ResidencyError).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A size, duration or name that cannot be right (negative, absurd, empty).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// The model has no reservation.
class UnknownModel : public Error {
 public:
  using Error::Error;
};

/// No device has that id.
class UnknownDevice : public Error {
 public:
  using Error::Error;
};

/// The call does not fit the reservation's lifecycle (e.g. loaded() twice, unloaded() before begin_unload()).
class InvalidState : public Error {
 public:
  using Error::Error;
};

/// The model is in use (refcount > 0) and the call would take it away.
class ModelBusy : public InvalidState {
 public:
  using InvalidState::InvalidState;
};

/// release() without a matching acquire().
class NotAcquired : public InvalidState {
 public:
  using InvalidState::InvalidState;
};

/// The change would make a device's reservations exceed its budget.
class BudgetExceeded : public Error {
 public:
  using Error::Error;
};

}  // namespace residency
