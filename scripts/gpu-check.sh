#!/usr/bin/env bash
# Checks residency on a real NVIDIA GPU: memory probes, recovery after a runner exits, the
# estimator against llama.cpp's CUDA build, and a swap through `residency serve`.
#
#   scripts/gpu-check.sh [LLAMA_CPP_SOURCE_DIR | path/to/llama-server]
#
# With a llama.cpp source tree (e.g. vendor/llama.cpp of llama-cpp-python's sdist), builds its
# llama-server with CUDA for this GPU's architecture first (a few minutes on 16 cores). cuBLAS
# comes from the toolkit or, where the toolkit has none, from NVIDIA's pip wheels. Needs residency
# installed (with its dependencies), nvidia-smi, NVML and libcudart. Never part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
mkdir -p "$out"
arg=${1:-}

server=""
if [[ -x "$arg" && ! -d "$arg" ]]; then
  server=$arg
elif [[ -d "$arg" ]]; then
  cuda=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  extra=()
  if ! find "$cuda/" -name 'libcublas.so*' | grep -q .; then
    wheels=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
    lib=$(find "$wheels" -name 'libcublas.so*' | head -1)
    lt=$(find "$wheels" -name 'libcublasLt.so*' | head -1)
    inc=$(dirname "$(find "$wheels" -name cublas_v2.h | head -1)")
    extra=(-DCUDA_cublas_LIBRARY="$lib" -DCUDA_cublasLt_LIBRARY="$lt"
      "-DCMAKE_CUDA_FLAGS=-I$inc" "-DCMAKE_CXX_FLAGS=-I$inc")
    export LD_LIBRARY_PATH="$(dirname "$lib"):${LD_LIBRARY_PATH:-}"
  fi
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 | tr -d .)
  build="$out/llama-build"
  cmake -S "$arg" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DBUILD_SHARED_LIBS=OFF "${extra[@]}" >"$out/llama-configure.log"
  cmake --build "$build" --target llama-server -j"$(nproc)" >"$out/llama-build.log"
  server="$build/bin/llama-server"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.reserved,memory.used,memory.free \
  --format=csv
python3 -m residency devices --backend nvml
python3 -m residency devices --backend cuda
python3 benchmarks/bench_gpu_recovery.py | tee "$out/recovery.log" | tail -1
if [[ -n "$server" ]]; then
  python3 benchmarks/bench_gpu_estimate.py --llama-server "$server" --raw "$out/estimate.json" \
    | tee "$out/estimate.log" | tail -1
  python3 benchmarks/bench_gpu_swap.py --llama-server "$server" --log "$out/serve.log" \
    | tee "$out/swap.log" | tail -1
fi
