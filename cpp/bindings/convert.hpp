#pragma once
// Argument conversion shared by the binding files: Python ints checked into the core's types, so a
// negative or overflowing size raises InvalidArgumentError instead of a bare TypeError.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>

#include "residency/errors.hpp"
#include "residency/types.hpp"

namespace residency::bindings {

inline std::uint64_t to_bytes(const pybind11::int_& value, const char* what) {
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
  if (overflow > 0) throw InvalidArgument(std::string(what) + " is absurdly large");
  if (overflow < 0 || v < 0) throw InvalidArgument(std::string(what) + " must not be negative");
  return static_cast<std::uint64_t>(v);
}

/// kNever (no deadline) crosses into Python as None.
inline std::optional<Nanos> deadline(Nanos t) {
  return t == kNever ? std::nullopt : std::optional<Nanos>(t);
}

}  // namespace residency::bindings
