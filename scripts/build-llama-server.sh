#!/usr/bin/env bash
# Builds llama.cpp's llama-server for this host into residency's cache (reused when present) and
# prints its path. Same code path as `residency build-runner`; options: --jobs N, --force.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m residency build-runner "$@"
