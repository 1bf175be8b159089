"""The llama.cpp facts module, and the runner kinds that own their argv and estimator options."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from residency.estimate import KV_TYPES
from residency.estimate.measure import GGML_TYPE_IDS, parse_buffers
from residency.llamacpp import (
    KV_CACHE_TYPES,
    needs_flash_attn,
    parse_buffer_line,
    slots_ctx_size,
)
from residency.runners import (
    CommandRunner,
    LaunchSpec,
    LlamaCppPythonRunner,
    LlamaServerRunner,
    runner_class,
)


def test_kv_cache_types_agree_with_ggml() -> None:
    for name, kv in KV_CACHE_TYPES.items():
        ggml = GGMLQuantizationType[name.upper()]
        assert kv.type_id == ggml.value, name
        assert (kv.block, kv.block_bytes) == GGML_QUANT_SIZES[ggml], name
    # The estimator's and the measurement's views are the same table.
    assert {n: (t.block, t.block_bytes) for n, t in KV_CACHE_TYPES.items()} == KV_TYPES
    assert {n: t.type_id for n, t in KV_CACHE_TYPES.items()} == GGML_TYPE_IDS


def test_flash_attention_only_for_a_quantised_cache() -> None:
    assert [k for k in KV_CACHE_TYPES if needs_flash_attn(k)] == [
        "q8_0",
        "q4_0",
        "q4_1",
        "q5_0",
        "q5_1",
        "iq4_nl",
    ]
    assert needs_flash_attn("Q8_0")
    assert not needs_flash_attn("nonsense")


@pytest.mark.parametrize(
    ("line", "device", "kind", "mib"),
    [
        (
            "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB",
            "CPU_Mapped",
            "model",
            235.16,
        ),
        ("llama_kv_cache:      CUDA0 KV buffer size =    15.00 MiB", "CUDA0", "KV", 15.0),
        (
            "0.00.812.345 I llama_context:  CUDA_Host  output buffer size = 1.00 MiB",
            "CUDA_Host",
            "output",
            1.0,
        ),
        ("sched_reserve:        CPU compute buffer size =   514.50 MiB", "CPU", "compute", 514.5),
    ],
)
def test_one_buffer_line_parser_for_runners_and_measurements(
    line: str, device: str, kind: str, mib: float
) -> None:
    buffer = parse_buffer_line(line)
    assert buffer is not None
    assert (buffer.device, buffer.kind) == (device, kind)
    assert buffer.size_bytes == pytest.approx(mib * 2**20)
    assert parse_buffers(line).buffers == {(device, kind): round(mib * 2**20)}
    assert (
        parse_buffer_line("llama_model_loader: - kv 0: general.architecture str = gemma3") is None
    )


def _spec(**kw: object) -> LaunchSpec:
    base: dict[str, object] = {
        "name": "m",
        "model_path": Path("/models/m.gguf"),
        "ctx": 2048,
        "parallel": 4,
        "kv_type": "q8_0",
        "gpu_layers": -1,
        "binary": sys.executable,  # any existing file will do for building the argv
    }
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def test_llama_server_slots_share_the_context_in_argv_and_estimate() -> None:
    argv = LlamaServerRunner(_spec()).argv()
    ctx_size = int(argv[argv.index("--ctx-size") + 1])
    assert ctx_size == slots_ctx_size(2048, 4) == 8192
    opts = LlamaServerRunner.estimate_options(ctx=2048, parallel=4, kv_type="q8_0", embedding=None)
    assert opts["ctx"] == ctx_size
    assert opts["parallel"] == 4
    assert opts["embeddings"] is True  # the kind's default: on (completions still served)
    assert "--embeddings" in argv
    assert "--embeddings" not in LlamaServerRunner(_spec(embedding=False)).argv()


def test_llama_cpp_python_owns_its_defaults() -> None:
    r = LlamaCppPythonRunner(_spec())
    argv = r.argv()
    assert argv[argv.index("--embedding") + 1] == "true"  # the kind's default: on
    assert argv[argv.index("--flash_attn") + 1] == "true"  # q8_0 needs it
    opts = LlamaCppPythonRunner.estimate_options(
        ctx=2048, parallel=4, kv_type="q8_0", embedding=None
    )
    assert opts["embeddings"] is True
    assert (opts["parallel"], opts["kv_unified"]) == (256, True)
    off = LlamaCppPythonRunner.estimate_options(
        ctx=2048, parallel=4, kv_type="f16", embedding=False
    )
    assert off["parallel"] == 1
    bf16 = LlamaCppPythonRunner(_spec(kv_type="bf16")).argv()
    assert "--flash_attn" not in bf16  # bf16 is not quantised: llama.cpp needs no flash attention


def test_every_kind_answers_for_its_estimator_options() -> None:
    for kind in ("llama-cpp-python", "llama-server", "command"):
        opts = runner_class(kind).estimate_options(
            ctx=1024, parallel=1, kv_type="f16", embedding=False
        )
        assert opts["ctx"] == 1024
    assert CommandRunner.estimate_options(
        ctx=1024, parallel=2, kv_type="f16", embedding=None
    ) == LlamaCppPythonRunner.estimate_options(ctx=1024, parallel=2, kv_type="f16", embedding=None)


@pytest.mark.parametrize("kind", ["llama-server", "llama-cpp-python"])
def test_flash_attention_set_explicitly_reaches_the_estimate(kind: str, tmp_path: Path) -> None:
    from estimate_models import write_llama
    from residency.config import ModelConfig, load_settings
    from residency.estimate import estimate
    from residency.registry import Registry
    from residency.scheduler.sizing import Sizing

    gguf = write_llama(tmp_path / "m.gguf")
    cls = runner_class(kind)
    kw: dict[str, Any] = {"ctx": 4096, "parallel": 1, "kv_type": "f16", "embedding": False}
    on = cls.estimate_options(**kw, flash_attention=True)
    off = cls.estimate_options(**kw, flash_attention=False)
    assert (on["flash_attn"], off["flash_attn"]) == (True, False)
    # Without flash attention llama.cpp materialises KQ: a larger compute buffer on the GPU.
    gpu: dict[str, Any] = {"device": "gpu", "gpu_layers": "all"}
    assert estimate(gguf, **off, **gpu).gpu_bytes > estimate(gguf, **on, **gpu).gpu_bytes
    # OLLAMA_FLASH_ATTENTION=0 (the settings' flash_attention) reaches the scheduler's estimate.
    model = ModelConfig(name="m", path=gguf, runner=kind)  # type: ignore[arg-type]
    settings = load_settings(models=[model], flash_attention=False, discover=False)
    entry = Registry.from_settings(settings).resolve("m")
    sizing = Sizing(settings)
    want = sizing.options(entry, None)
    assert sizing.estimate_options(entry, want)["flash_attn"] is False


def test_a_models_projector_goes_to_llama_server_and_into_its_reservation(tmp_path: Path) -> None:
    import asyncio

    from estimate_models import write_llama
    from residency.config import ModelConfig, load_settings
    from residency.registry import Registry
    from residency.scheduler.sizing import Sizing

    proj = tmp_path / "mmproj.gguf"
    proj.write_bytes(b"\0" * 123_456)
    argv = LlamaServerRunner(_spec(projectors=(proj,))).argv()
    assert argv[argv.index("--mmproj") + 1] == str(proj)
    assert "--mmproj" not in LlamaServerRunner(_spec()).argv()

    gguf = write_llama(tmp_path / "m.gguf")
    models = [
        ModelConfig(name="plain", path=gguf, runner="llama-server"),
        ModelConfig(name="vision", path=gguf, runner="llama-server", projectors=[proj]),
    ]
    settings = load_settings(models=models, discover=False)
    registry = Registry.from_settings(settings)
    sizing = Sizing(settings)

    async def needed(name: str) -> int:
        entry = registry.resolve(name)
        return (await sizing.needed(entry, sizing.options(entry, None), False))[0]

    assert asyncio.run(needed("vision")) - asyncio.run(needed("plain")) == 123_456
