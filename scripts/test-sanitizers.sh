#!/usr/bin/env bash
# Builds the core with AddressSanitizer + UndefinedBehaviorSanitizer (or ThreadSanitizer with
# `--tsan`) into a private virtualenv under build/, then runs the core's tests against that build.
# The sanitizer runtime must be loaded before Python itself, hence LD_PRELOAD.
#   usage: scripts/test-sanitizers.sh [--tsan] [pytest args…]
set -euo pipefail
cd "$(dirname "$0")/.."
kind=asan
if [[ "${1:-}" == "--tsan" ]]; then kind=tsan; shift; fi
venv="build/${kind}-venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q scikit-build-core pybind11 ninja cmake numpy hypothesis pytest pytest-timeout pytest-asyncio mypy
if [[ "$kind" == asan ]]; then
  export RESIDENCY_SANITIZE=ON; runtime="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
  export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
else
  export RESIDENCY_TSAN=ON; runtime="$(g++ -print-file-name=libtsan.so)"
  export TSAN_OPTIONS=halt_on_error=1
fi
"$venv/bin/pip" install -q --no-build-isolation --no-deps \
  -Cbuild-dir="build/${kind}" -Ccmake.define.RESIDENCY_TSAN="${RESIDENCY_TSAN:-OFF}" .
# Run from outside the source tree so the sanitized wheel, not the sources, is imported.
root="$(pwd)"; tests="$root/tests"
if [[ $# -eq 0 ]]; then set -- "$tests/test_resident_set.py" "$tests/test_resident_set_stateful.py" "$tests/test_engine.py"; fi
cd build
LD_PRELOAD="$runtime" "../$venv/bin/python" -m pytest -p no:cacheprovider -c "$root/pyproject.toml" \
  --rootdir="$root" "$@"
