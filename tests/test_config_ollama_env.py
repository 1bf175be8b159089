"""The remaining OLLAMA_* variables, with Ollama's meaning, beside their RESIDENCY_* twins."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from residency.catalog import with_server_defaults
from residency.config import ModelConfig, load_settings
from residency.errors import ConfigError
from residency.runners import LaunchSpec, runner_class

TWINS = {
    "OLLAMA_MODELS": "RESIDENCY_OLLAMA_MODELS",
    "OLLAMA_CONTEXT_LENGTH": "RESIDENCY_DEFAULT_CTX",
    "OLLAMA_KV_CACHE_TYPE": "RESIDENCY_KV_CACHE_TYPE",
    "OLLAMA_FLASH_ATTENTION": "RESIDENCY_FLASH_ATTENTION",
    "OLLAMA_SCHED_SPREAD": "RESIDENCY_SCHED_SPREAD",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for pair in TWINS.items():
        for name in pair:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RESIDENCY_CONFIG", raising=False)


def test_defaults() -> None:
    s = load_settings()
    assert s.ollama_models is None
    assert s.default_ctx == 4096
    assert s.kv_cache_type == "f16"
    assert s.flash_attention is None  # the runner's own default
    assert s.sched_spread is False


def test_ollama_names_with_ollamas_meaning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", "/srv/ollama/models")
    monkeypatch.setenv("OLLAMA_CONTEXT_LENGTH", "8192")
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "Q8_0")
    monkeypatch.setenv("OLLAMA_FLASH_ATTENTION", "1")
    monkeypatch.setenv("OLLAMA_SCHED_SPREAD", "true")
    s = load_settings()
    assert s.ollama_models == Path("/srv/ollama/models")
    assert s.default_ctx == 8192
    assert s.kv_cache_type == "q8_0"
    assert s.flash_attention is True
    assert s.sched_spread is True


def test_residency_twin_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "OLLAMA_MODELS": ("/a", "/b"),
        "OLLAMA_CONTEXT_LENGTH": ("1024", "2048"),
        "OLLAMA_KV_CACHE_TYPE": ("q4_0", "q8_0"),
        "OLLAMA_FLASH_ATTENTION": ("1", "0"),
        "OLLAMA_SCHED_SPREAD": ("1", "0"),
    }
    for ollama, (theirs, ours) in values.items():
        monkeypatch.setenv(ollama, theirs)
        monkeypatch.setenv(TWINS[ollama], ours)
    s = load_settings()
    assert (s.ollama_models, s.default_ctx, s.kv_cache_type) == (Path("/b"), 2048, "q8_0")
    assert (s.flash_attention, s.sched_spread) == (False, False)


def test_empty_means_unset_as_in_ollama(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_FLASH_ATTENTION", "")
    monkeypatch.setenv("OLLAMA_SCHED_SPREAD", " ")
    s = load_settings()
    assert s.flash_attention is None
    assert s.sched_spread is False


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "OLLAMA_CONTEXT_LENGTH",
            "0",
            "default_ctx (RESIDENCY_DEFAULT_CTX, OLLAMA_CONTEXT_LENGTH)",
        ),
        ("OLLAMA_CONTEXT_LENGTH", "big", "OLLAMA_CONTEXT_LENGTH"),
        ("OLLAMA_KV_CACHE_TYPE", "q3_k", "unknown KV cache type 'q3_k'"),
        ("OLLAMA_FLASH_ATTENTION", "maybe", "flash_attention"),
        ("OLLAMA_SCHED_SPREAD", "sometimes", "sched_spread"),
    ],
)
def test_bad_values_are_precise_errors(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings()


def test_toml_names(tmp_path: Path) -> None:
    config = tmp_path / "r.toml"
    config.write_text(
        'ollama_models = "store"\nkv_cache_type = "q4_0"\nflash_attention = true\n'
        "default_ctx = 2048\nsched_spread = true\n"
    )
    s = load_settings(config)
    assert s.ollama_models == tmp_path / "store"  # relative to the file
    assert (s.kv_cache_type, s.flash_attention, s.default_ctx, s.sched_spread) == (
        "q4_0",
        True,
        2048,
        True,
    )


def _model(**kw: object) -> ModelConfig:
    return ModelConfig(name="m", path=Path("/m.gguf"), **kw)  # type: ignore[arg-type]


def test_kv_cache_type_applies_where_a_model_sets_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "q8_0")
    s = load_settings()
    assert with_server_defaults(_model(), s).kv_type == "q8_0"
    assert with_server_defaults(_model(kv_type="f16"), s).kv_type == "f16"  # explicit wins


@pytest.mark.parametrize(
    ("runner", "on", "off"),
    [
        ("llama-server", ["--flash-attn", "on"], ["--flash-attn", "off"]),
        ("llama-cpp-python", ["--flash_attn", "true"], ["--flash_attn", "false"]),
    ],
)
def test_flash_attention_reaches_the_runner_command_line(
    monkeypatch: pytest.MonkeyPatch, runner: str, on: list[str], off: list[str]
) -> None:
    def argv(config: ModelConfig) -> list[str]:
        """The command line the runner kind builds for the model as the server configures it."""
        served = with_server_defaults(config, load_settings())
        spec = LaunchSpec(
            name="m",
            model_path=Path("/m.gguf"),
            ctx=512,
            parallel=1,
            kv_type=served.kv_type,
            gpu_layers=0,
            args=tuple(served.args),
            flash_attention=served.flash_attention,
            binary="/bin/true",
        )
        return runner_class(runner)(spec).argv()

    def has(found: list[str], pair: list[str]) -> bool:
        return any(found[i : i + 2] == pair for i in range(len(found) - 1))

    monkeypatch.setenv("RESIDENCY_KV_PERSIST", "0")
    monkeypatch.setenv("OLLAMA_FLASH_ATTENTION", "1")
    assert has(argv(_model(runner=runner, args=["-x"])), on)
    assert has(argv(_model(runner=runner, flash_attention=False)), off)
    monkeypatch.setenv("OLLAMA_FLASH_ATTENTION", "")
    plain = _model(runner=runner)
    assert with_server_defaults(plain, load_settings()) is plain  # the runner's default
    assert not has(argv(plain), on)
    assert not has(argv(plain), off)


def test_quantised_kv_without_flash_attention_falls_back_to_f16(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "q4_0")
    monkeypatch.setenv("OLLAMA_FLASH_ATTENTION", "false")
    with caplog.at_level(logging.WARNING):
        config = with_server_defaults(_model(runner="llama-server"), load_settings())
    assert config.kv_type == "f16"
    assert "needs flash attention" in caplog.text
