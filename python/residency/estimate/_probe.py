"""Child process for :mod:`residency.estimate.measure`: load a model in llama.cpp and exit.

Runs as ``python -m residency.estimate._probe '<json options>'``. llama.cpp writes its buffer
accounting to the log; llama-cpp-python's log callback prints it on this process's stderr, which the
parent parses. Nothing is evaluated: constructing the context allocates every buffer llama.cpp
reports (weights, KV cache, output, and the compute buffers reserved for the worst-case graph).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    opts = json.loads(argv[0])
    import llama_cpp  # imported here: the parent never loads llama.cpp itself

    # The package's callback prints every level to sys.stderr when its logger allows DEBUG.
    from llama_cpp import _logger

    _logger.set_verbose(True)
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = int(opts["n_gpu_layers"])
    mparams.use_mmap = bool(opts.get("use_mmap", True))
    model = llama_cpp.llama_model_load_from_file(str(opts["path"]).encode(), mparams)
    if not model:
        print("residency-probe: model failed to load", file=sys.stderr)
        return 2
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = int(opts["n_ctx"])
    cparams.n_batch = int(opts["n_batch"])
    cparams.n_ubatch = int(opts["n_ubatch"])
    cparams.n_seq_max = int(opts["n_seq_max"])
    cparams.type_k = int(opts["type_k"])
    cparams.type_v = int(opts["type_v"])
    cparams.flash_attn_type = int(opts["flash_attn_type"])
    cparams.swa_full = bool(opts["swa_full"])
    cparams.kv_unified = bool(opts["kv_unified"])
    cparams.embeddings = bool(opts["embeddings"])
    cparams.offload_kqv = bool(opts.get("offload_kqv", True))
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        print("residency-probe: context failed to initialise", file=sys.stderr)
        return 3
    print("residency-probe: ok", file=sys.stderr, flush=True)
    # Exit without freeing: the parent has what it needs, and teardown only costs time.
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
