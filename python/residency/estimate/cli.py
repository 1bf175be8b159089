"""``residency estimate MODEL.gguf``: the memory a model needs, as a table or JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Any

from residency.errors import EstimateError

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str) -> int:
    """``8GiB``, ``512MiB``, ``8GB`` (decimal) or plain bytes."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8GiB, 512MiB, 1000000)")
    unit = (m[2] or "").upper()
    prefix = unit[:1] if unit[:1] in "KMGT" else ""
    base = 1024 ** ("KMGT".index(prefix) + 1) if prefix and "I" in unit else _UNITS[prefix]
    return int(float(m[1]) * base)


def _gpu_layers(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a layer count: {text!r} (a number or 'all')"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError("gpu layers must be >= 0")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "estimate",
        help="predict the memory a GGUF model needs in llama.cpp",
        description=(
            "Predict the buffers llama.cpp allocates for a GGUF model (weights, KV cache, output, "
            "compute) from its header and tensor table, and the GPU layers that fit a budget."
        ),
    )
    parser.add_argument("model", help="path of a .gguf file")
    parser.add_argument(
        "--ctx",
        type=int,
        default=4096,
        help="llama.cpp n_ctx, shared by --parallel sequences (0 = trained)",
    )
    parser.add_argument("--parallel", type=int, default=1, help="sequences (n_seq_max, --parallel)")
    parser.add_argument("--kv-type", default="f16", help="KV cache type: f16, q8_0, q4_0, ...")
    parser.add_argument("--batch", type=int, default=2048, help="n_batch")
    parser.add_argument(
        "--ubatch", type=int, default=512, help="n_ubatch (the compute buffer scales with it)"
    )
    parser.add_argument(
        "--gpu-layers", type=_gpu_layers, default=None, help="layers on the GPU (-ngl), or 'all'"
    )
    parser.add_argument(
        "--gpu-overhead",
        type=parse_size,
        default=None,
        help="per-runner GPU overhead (default 512MiB)",
    )
    parser.add_argument(
        "--budget",
        type=parse_size,
        default=None,
        help="GPU bytes available: print the layers that fit",
    )
    parser.add_argument(
        "--flash-attn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flash attention (default: only for a quantised KV cache)",
    )
    parser.add_argument(
        "--swa-full", action="store_true", help="full-size cache for sliding-window layers"
    )
    parser.add_argument(
        "--kv-unified", action="store_true", help="one KV stream shared by all sequences"
    )
    parser.add_argument(
        "--embeddings", action="store_true", help="the context also returns embeddings"
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also load the model in llama.cpp (llama-cpp-python) and show what it reports",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from residency.estimate import DEFAULT_GPU_OVERHEAD_BYTES, estimate, fit_layers, format_bytes

    gpu_layers = args.gpu_layers if args.gpu_layers is not None else 0
    opts: dict[str, Any] = {
        "ctx": args.ctx,
        "parallel": args.parallel,
        "kv_type": args.kv_type,
        "batch": args.batch,
        "ubatch": args.ubatch,
        "gpu_overhead_bytes": args.gpu_overhead
        if args.gpu_overhead is not None
        else DEFAULT_GPU_OVERHEAD_BYTES,
        "flash_attn": args.flash_attn,
        "swa_full": args.swa_full,
        "kv_unified": args.kv_unified,
        "embeddings": args.embeddings,
    }
    try:
        est = estimate(
            args.model, gpu_layers=gpu_layers, device="gpu" if gpu_layers else "cpu", **opts
        )
        fit = fit_layers(args.model, args.budget, **opts) if args.budget is not None else None
        measured = None
        if args.measure:
            from residency.estimate.measure import measure

            m = measure(
                args.model,
                gpu_layers=0,
                **{k: v for k, v in opts.items() if k != "gpu_overhead_bytes"},
            )
            measured = {f"{dev} {kind}": b for (dev, kind), b in m.buffers.items()} | {
                "total": m.total_bytes
            }
    except EstimateError as err:
        print(f"residency estimate: error: {err}", file=sys.stderr)
        return 2

    if args.json:
        doc: dict[str, Any] = {
            k: (str(v) if k == "path" else v) for k, v in dataclasses.asdict(est).items()
        }
        if fit is not None:
            doc["fit"] = dataclasses.asdict(fit) | {"budget_bytes": args.budget}
        if measured is not None:
            doc["measured"] = measured
        print(json.dumps(doc, indent=2))
        return 0

    rows = [
        (
            "weights",
            est.weights_bytes,
            f"layers {format_bytes(est.weights_layers_bytes)}, "
            f"other {format_bytes(est.weights_other_bytes)}"
            + (
                f", repacked {format_bytes(est.weights_repack_bytes)}"
                if est.weights_repack_bytes
                else ""
            ),
        ),
        (
            "KV cache",
            est.kv_bytes,
            f"{args.kv_type}, {est.n_ctx_seq} cells x {args.parallel} seq"
            + (f", sliding-window {format_bytes(est.kv_swa_bytes)}" if est.kv_swa_bytes else ""),
        ),
        ("output", est.output_bytes, ""),
        ("compute", est.compute_bytes, f"ubatch {min(args.ubatch, args.batch, est.n_ctx)}"),
        ("overhead", est.overhead_bytes, "GPU runner" if est.overhead_bytes else ""),
    ]
    print(
        f"{est.path.name}: {est.family}, {est.parameter_count / 1e6:,.0f}M parameters, "
        f"{est.quantization}, "
        f"{est.n_layers} layers, trained context {est.context_length}"
    )
    for name, b, note in rows:
        print(f"  {name:<10} {format_bytes(b):>12}  {note}")
    print(
        f"  {'total':<10} {format_bytes(est.total_bytes):>12}  "
        f"(GPU {format_bytes(est.gpu_bytes)}, host {format_bytes(est.host_bytes)})"
    )
    ratio = est.seed_formula_bytes / est.total_bytes if est.total_bytes else 0.0
    print(
        f"  {'seed formula':<10} {format_bytes(est.seed_formula_bytes):>10}  "
        f"(parameters x bytes + f16 KV at full context + 10 %: {ratio:.2f}x this estimate)"
    )
    if measured is not None:
        print(
            f"  {'llama.cpp':<10} {format_bytes(measured['total']):>12}  measured: "
            + ", ".join(f"{k} {format_bytes(v)}" for k, v in measured.items() if k != "total")
        )
    if fit is not None:
        print(
            f"budget {format_bytes(args.budget)}: {fit.layers} of {est.n_layers + 1} layers "
            "on the GPU "
            f"(GPU {format_bytes(fit.gpu_bytes)}, host {format_bytes(fit.host_bytes)})"
        )
    return 0
