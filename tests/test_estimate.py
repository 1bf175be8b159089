"""The memory estimator: errors, arithmetic, layer fit, CLI, and (e2e) llama.cpp's own numbers."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from residency.cli import main
from residency.embedded import default_model_path
from residency.errors import EstimateError
from residency.estimate import estimate, fit_layers, read_model
from residency.estimate.measure import Measured, measure, parse_buffers

sys.path.insert(0, str(Path(__file__).parent))
from estimate_models import write_llama
from scheduler_helpers import require_llama_cpp

MiB = 1 << 20


@pytest.fixture(scope="module")
def gemma() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("gguf") / "llama.gguf", n_embd=256, n_head=8)


# ---- errors ----------------------------------------------------------------------------------


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(EstimateError, match=r"notes\.txt: not a GGUF file"):
        estimate(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EstimateError, match=r"absent\.gguf: cannot read"):
        estimate(tmp_path / "absent.gguf")


def test_truncated(tmp_path: Path, small_llama: Path) -> None:
    data = small_llama.read_bytes()
    for keep in (len(data) // 2, 64):
        p = tmp_path / f"cut{keep}.gguf"
        p.write_bytes(data[:keep])
        with pytest.raises(EstimateError, match=rf"cut{keep}\.gguf: .*truncated"):
            estimate(p)


def test_unsupported_architecture(tmp_path: Path) -> None:
    p = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(p), "mamba")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EstimateError, match=r"mamba\.gguf: architecture 'mamba' is not supported"):
        estimate(p)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"parallel": 0}, "parallel must be"),
        ({"parallel": 257}, "parallel must be <= 256"),
        ({"ctx": -1}, "ctx must be"),
        ({"ubatch": 0}, "ubatch must be"),
        ({"kv_type": "q3_x"}, "unknown KV cache type"),
        ({"kv_type": "q8_0", "flash_attn": False}, "needs flash attention"),
        ({"device": "tpu"}, "device must be"),
        ({"gpu_layers": -2, "device": "gpu"}, "gpu_layers must be"),
    ],
)
def test_impossible_options(gemma: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(EstimateError, match=message) as err:
        estimate(gemma, **options)
    assert str(gemma.name) in str(err.value)


# ---- arithmetic ------------------------------------------------------------------------------


def test_metadata(gemma: Path) -> None:
    est = estimate(gemma)
    info = read_model(gemma)
    assert (est.family, est.n_layers, est.context_length) == ("gemma3", 18, 32768)
    assert est.quantization == "Q4_K_M"
    assert 260e6 < est.parameter_count < 280e6
    # Gemma 3 alternates five sliding-window layers with one global layer.
    assert info.is_swa.count(False) == 3
    assert info.n_swa == 512
    assert est.weights_layers_bytes + est.weights_other_bytes == sum(
        t.n_bytes for t in info.tensors
    )


def test_kv_scales_as_llama_cpp_sizes_it(gemma: Path) -> None:
    base = estimate(gemma, ctx=8192)
    double = estimate(gemma, ctx=16384)
    # Only the three global layers grow with the context; the SWA cache stays at window + ubatch.
    assert double.kv_swa_bytes == base.kv_swa_bytes
    assert double.kv_bytes - base.kv_bytes == base.kv_bytes - base.kv_swa_bytes
    # q8_0 stores 34 bytes per 32 values where f16 stores 64.
    q8 = estimate(gemma, ctx=8192, kv_type="q8_0")
    assert q8.kv_bytes * 64 == base.kv_bytes * 34
    # parallel sequences split the context: same global cache, one SWA cache per sequence.
    par = estimate(gemma, ctx=8192, parallel=4)
    assert par.n_ctx_seq == 2048
    assert par.kv_bytes - par.kv_swa_bytes == base.kv_bytes - base.kv_swa_bytes
    assert par.kv_swa_bytes > base.kv_swa_bytes
    full = estimate(gemma, ctx=8192, swa_full=True)
    assert full.kv_swa_bytes == 5 * (full.kv_bytes - full.kv_swa_bytes)


def test_compute_follows_ubatch_and_vocabulary(gemma: Path) -> None:
    # Gemma 3's 262k vocabulary: the logits of a full micro-batch decide the compute buffer.
    small = estimate(gemma, ubatch=128)
    large = estimate(gemma, ubatch=512)
    assert large.compute_bytes == pytest.approx(4 * small.compute_bytes, rel=0.01)
    assert large.compute_bytes > large.weights_bytes


def test_total_is_the_sum(gemma: Path) -> None:
    e = estimate(gemma, ctx=8192, parallel=2, device="gpu", gpu_layers=10)
    parts = e.weights_bytes + e.kv_bytes + e.output_bytes + e.compute_bytes + e.overhead_bytes
    assert e.total_bytes == parts == e.gpu_bytes + e.host_bytes
    assert e.overhead_bytes > 0
    assert e.gpu_layers == 10


def test_fit_layers(gemma: Path) -> None:
    everything = estimate(gemma, device="gpu", gpu_layers="all")
    assert fit_layers(gemma, 10**12).layers == everything.n_layers + 1
    assert fit_layers(gemma, 10**12).gpu_bytes == everything.gpu_bytes
    nothing = fit_layers(gemma, 0)
    assert nothing.layers == 0
    assert nothing.gpu_bytes == 0
    assert nothing.host_bytes == estimate(gemma).host_bytes
    budgets = [everything.gpu_bytes * k // 10 for k in range(11)]
    fits = [fit_layers(gemma, b) for b in budgets]
    assert [f.layers for f in fits] == sorted(f.layers for f in fits)
    for budget, fit in zip(budgets, fits, strict=True):
        assert fit.gpu_bytes <= budget
        if fit.layers <= everything.n_layers:  # one more layer would not have fitted
            assert estimate(gemma, device="gpu", gpu_layers=fit.layers + 1).gpu_bytes > budget


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_table(gemma: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(gemma), "--ctx", "8192", "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "KV cache", "compute", "total", "seed formula", "layers on the GPU"):
        assert word in out


def test_cli_json(gemma: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(gemma), "--kv-type", "q8_0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total_bytes"] == estimate(gemma, kv_type="q8_0").total_bytes
    assert doc["family"] == "gemma3"


def test_cli_error_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    assert main(["estimate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "x.gguf: not a GGUF file" in err
    assert "Traceback" not in err


def test_parse_buffers() -> None:
    log = (
        "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =    12.00 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =    60.00 MiB\n"
        "sched_reserve:        CPU compute buffer size =   514.50 MiB\n"
        "~llama_context:        CPU compute buffer size is 514.5020 MiB, matches expectation\n"
    )
    m = parse_buffers(log)
    assert m.kind("KV") == 72 * MiB
    assert m.kind("compute") == round(514.5 * MiB)
    assert m.total_bytes == round((235.16 + 72 + 514.5) * MiB)


def test_parse_buffers_of_llama_server() -> None:
    # llama-server (-lv 4) prefixes its time and level.
    log = (
        "0.01.401.354 I load_tensors:        CUDA0 model buffer size =   271.86 MiB\n"
        "0.01.450.478 I llama_context:  CUDA_Host  output buffer size =     1.00 MiB\n"
        "0.01.461.251 I sched_reserve:      CUDA0 compute buffer size =    21.52 MiB\n"
    )
    m = parse_buffers(log)
    assert m.buffers == {
        ("CUDA0", "model"): round(271.86 * MiB),
        ("CUDA_Host", "output"): MiB,
        ("CUDA0", "compute"): round(21.52 * MiB),
    }


# ---- the GPU placement, against llama-server on CUDA ------------------------------------------
# CUDA0 buffers (MiB) that llama-server, built from the llama.cpp llama-cpp-python 0.3.36 vendors,
# reported on an H100 for these generated models (benchmarks/bench_gpu_estimate.py, same shapes):
# they pin -fa auto (off for head sizes CUDA lacks), the output layer going first with -ngl, and
# llama-server's one row of logits per slot.
CUDA_SHAPES: dict[str, dict[str, Any]] = {
    "llama-attn": {"n_head": 16, "n_head_kv": 4, "n_ff": 512},  # head size 16: no CUDA FA
    "llama-ffn": {"n_layer": 3, "n_head": 4, "n_head_kv": 4, "n_ff": 8192},
    "qwen2-q8": {
        "arch": "qwen2",
        "n_layer": 6,
        "n_embd": 640,
        "n_head": 5,
        "n_head_kv": 1,
        "n_ff": 1792,
        "n_vocab": 8192,
        "weight_type": GGMLQuantizationType.Q8_0,
        "tied_output": True,
    },
    "gemma3-swa": {
        "arch": "gemma3",
        "n_layer": 7,
        "n_head": 8,
        "n_ff": 768,
        "n_vocab": 2048,
        "sliding_window": 256,
        "tied_output": True,
    },
}
CUDA_MEASURED = [
    ("llama-attn", {"ctx": 4096}, -1, (4.76, 4.0, 138.01)),
    ("llama-attn", {"ctx": 8192, "parallel": 4}, -1, (4.76, 32.0, 278.01)),
    ("llama-ffn", {"ctx": 4096}, -1, (38.01, 12.0, 53.51)),
    ("qwen2-q8", {"ctx": 8192}, -1, (32.28, 24.0, 22.26)),
    ("qwen2-q8", {"ctx": 8192}, 3, (14.3, 8.0, 24.42)),
    ("gemma3-swa", {"ctx": 16384}, -1, (11.09, 5.12, 293.52)),
]


@pytest.mark.parametrize(
    ("name", "opts", "layers", "mib"),
    CUDA_MEASURED,
    ids=[f"{c[0]}-{json.dumps(c[1])}-ngl{c[2]}" for c in CUDA_MEASURED],
)
def test_gpu_buffers_match_llama_server_on_cuda(
    tmp_path: Path, name: str, opts: dict[str, Any], layers: int, mib: tuple[float, ...]
) -> None:
    from residency.runners.llama import llama_server_estimate_options

    path = write_llama(tmp_path / f"{name}.gguf", **CUDA_SHAPES[name])
    e = estimate(
        path,
        device="gpu",
        gpu_layers="all" if layers < 0 else layers,
        **llama_server_estimate_options(
            ctx=opts["ctx"], parallel=opts.get("parallel", 1), kv_type="f16"
        ),
    )
    for what, predicted, got in zip(
        ("weights", "KV", "compute"),
        (e.gpu_weights_bytes, e.gpu_kv_bytes, e.gpu_compute_bytes),
        (round(m * MiB) for m in mib),
        strict=True,
    ):
        assert abs(predicted - got) <= max(0.05 * got, 4 * MiB), f"{what}: {predicted} vs {got}"
    assert e.gpu_bytes == (
        e.gpu_weights_bytes + e.gpu_kv_bytes + e.gpu_compute_bytes + e.overhead_bytes
    )


def test_ngl_1_is_the_output_layer(gemma: Path) -> None:
    # llama.cpp counts the output layer as the last: -ngl 1 offloads it alone (Gemma 3 270M ties it
    # to the token embeddings, which llama.cpp then copies to the GPU), and no repeating layer.
    e = estimate(gemma, device="gpu", gpu_layers=1)
    info = read_model(gemma)
    embd = next(t for t in info.tensors if t.name == "token_embd.weight")
    assert e.gpu_kv_bytes == 0
    assert e.gpu_weights_bytes >= embd.n_bytes
    assert e.gpu_weights_bytes < embd.n_bytes + 2 * MiB


def test_no_cpu_repack_with_a_gpu(gemma: Path) -> None:
    # A CUDA build keeps host weights in the mmap'ed file: no CPU_REPACK buffer (seen on an H100).
    assert estimate(gemma, device="gpu", gpu_layers=5).weights_repack_bytes == 0
    assert estimate(gemma, cpu_repack=True).weights_repack_bytes > 0


def test_llama_server_reserves_one_row_of_logits_per_slot(gemma: Path) -> None:
    every = estimate(gemma, device="gpu", gpu_layers="all")
    per_slot = estimate(gemma, device="gpu", gpu_layers="all", n_outputs=1)
    # Gemma 3's 262k vocabulary: 512 rows of logits are 512 MiB; one row is 1 MiB.
    assert every.gpu_compute_bytes - per_slot.gpu_compute_bytes > 440 * MiB
    assert per_slot.gpu_compute_bytes < 64 * MiB


def test_flash_attn_auto(tmp_path: Path, gemma: Path) -> None:
    odd = write_llama(tmp_path / "odd.gguf", n_head=8, n_head_kv=4, n_ff=512)  # head size 32
    for path, on_cuda in ((gemma, True), (odd, False)):
        auto = estimate(path, device="gpu", gpu_layers="all", flash_attn="auto")
        assert auto == estimate(path, device="gpu", gpu_layers="all", flash_attn=on_cuda)
        # On the CPU every head size runs flash attention.
        assert estimate(path, flash_attn="auto") == estimate(path, flash_attn=True)
    # A quantised V cache forces it on.
    q8 = estimate(odd, device="gpu", gpu_layers="all", flash_attn="auto", kv_type="q8_0")
    assert q8 == estimate(odd, device="gpu", gpu_layers="all", flash_attn=True, kv_type="q8_0")


# ---- against llama.cpp (real runner library, real Gemma 3 270M) --------------------------------

GRID = [
    {"ctx": ctx, "parallel": par, "kv_type": kv}
    for ctx in (2048, 8192, 32768)
    for par in (1, 4)
    for kv in ("f16", "q8_0")
]


def _measure_all(cases: list[tuple[Path, dict[str, Any]]]) -> list[Measured]:
    # Two at a time: each child is one core's worth of loading and ~1 GiB at most.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda c: measure(c[0], **c[1]), cases))


@pytest.fixture(scope="module")
def gemma_measured(gemma: Path) -> list[Measured]:
    require_llama_cpp()
    return _measure_all([(gemma, opts) for opts in GRID])


def _check(est_total: int, measured: Measured, est: Any, label: str) -> None:
    total = measured.total_bytes
    assert abs(est_total - total) <= max(0.05 * total, 16 * MiB), label
    # Each component too, so a right total cannot hide two wrong parts.
    for kind, predicted in (
        ("model", est.weights_bytes),
        ("KV", est.kv_bytes),
        ("output", est.output_bytes),
        ("compute", est.compute_bytes),
    ):
        got = measured.kind(kind)
        assert abs(predicted - got) <= max(0.05 * got, 2 * MiB), (
            f"{label}: {kind} {predicted} vs {got}"
        )


@pytest.mark.e2e
@pytest.mark.timeout(240)
@pytest.mark.parametrize("index", range(len(GRID)), ids=[json.dumps(g) for g in GRID])
def test_gemma_grid_matches_llama_cpp(
    gemma: Path, gemma_measured: list[Measured], index: int
) -> None:
    opts = GRID[index]
    est = estimate(gemma, **opts)
    _check(est.total_bytes, gemma_measured[index], est, json.dumps(opts))


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_other_shapes_match_llama_cpp(tmp_path: Path) -> None:
    require_llama_cpp()
    # Shapes where attention, the feed-forward layer or a sliding window decide the compute buffer.
    models = [
        write_llama(tmp_path / "attn.gguf", n_head=16, n_head_kv=4, n_ff=512),
        write_llama(tmp_path / "ffn.gguf", n_layer=3, n_head=4, n_head_kv=4, n_ff=8192),
        write_llama(
            tmp_path / "qwen.gguf",
            arch="qwen2",
            n_embd=512,
            n_head=8,
            n_ff=1536,
            n_vocab=4096,
            weight_type=GGMLQuantizationType.Q8_0,
            tied_output=True,
        ),
        write_llama(
            tmp_path / "gemma.gguf",
            arch="gemma3",
            n_layer=7,
            n_head=8,
            n_ff=768,
            n_vocab=2048,
            sliding_window=256,
            tied_output=True,
        ),
    ]
    configs: list[dict[str, Any]] = [{"ctx": 16384}, {"ctx": 16384, "parallel": 4}]
    cases = [(m, c) for m in models for c in configs]
    for (model, opts), measured in zip(cases, _measure_all(cases), strict=True):
        est = estimate(model, **opts)
        _check(est.total_bytes, measured, est, f"{model.name} {opts}")
