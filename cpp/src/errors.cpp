// Out-of-line anchor so the exception classes' vtables live in one translation unit.
#include "residency/errors.hpp"
