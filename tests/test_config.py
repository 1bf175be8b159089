"""Settings (TOML, RESIDENCY_* and OLLAMA_* variables, overrides) and the model registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from residency.config import ModelConfig, load_settings
from residency.embedded import DEFAULT_MODEL_NAME, default_model_path
from residency.errors import ConfigError, ModelNotFoundError
from residency.registry import Registry, gguf_details, make_entry, read_gguf_header

ENV_NAMES = [
    "RESIDENCY_CONFIG",
    "RESIDENCY_HOST",
    "RESIDENCY_PORT",
    "RESIDENCY_KEEP_ALIVE",
    "RESIDENCY_MAX_LOADED_MODELS",
    "OLLAMA_HOST",
    "OLLAMA_KEEP_ALIVE",
    "OLLAMA_MAX_LOADED_MODELS",
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_MAX_QUEUE",
    "OLLAMA_GPU_OVERHEAD",
    "OLLAMA_LOAD_TIMEOUT",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_ollamas() -> None:
    s = load_settings()
    assert (s.host, s.port, s.keep_alive, s.max_loaded_models) == ("127.0.0.1", 11434, "5m", 3)
    assert (s.num_parallel, s.max_queue, s.gpu_overhead) == (1, 512, 0)
    assert s.keep_alive_ns() == 300 * 10**9
    assert s.load_timeout_s() == 300.0
    assert s.recovery_timeout_s == 5.0
    assert s.ping_timeout_s == 10.0


def test_ollama_variables_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:11500")
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "-1")
    monkeypatch.setenv("OLLAMA_MAX_LOADED_MODELS", "2")
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "4")
    monkeypatch.setenv("OLLAMA_MAX_QUEUE", "10")
    monkeypatch.setenv("OLLAMA_GPU_OVERHEAD", "1073741824")
    monkeypatch.setenv("OLLAMA_LOAD_TIMEOUT", "10m")
    s = load_settings()
    assert (s.host, s.port) == ("0.0.0.0", 11500)
    assert s.keep_alive_ns() < 0
    assert (s.max_loaded_models, s.num_parallel, s.max_queue) == (2, 4, 10)
    assert s.gpu_overhead == 1 << 30
    assert s.load_timeout_s() == 600.0


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("http://example.local:8080", "example.local", 8080),
        ("[::1]:9000", "::1", 9000),
        ("10.0.0.1", "10.0.0.1", 11434),
        (":7000", "127.0.0.1", 7000),
    ],
)
def test_ollama_host_forms(
    monkeypatch: pytest.MonkeyPatch, value: str, host: str, port: int
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", value)
    s = load_settings()
    assert (s.host, s.port) == (host, port)


def test_priority_overrides_then_residency_then_ollama_then_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = tmp_path / "residency.toml"
    cfg.write_text('keep_alive = "1m"\nmax_queue = 7\nmax_loaded_models = 5\n')
    assert load_settings(cfg).keep_alive == "1m"
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "2m")
    assert load_settings(cfg).keep_alive == "2m"
    monkeypatch.setenv("RESIDENCY_KEEP_ALIVE", "3m")
    assert load_settings(cfg).keep_alive == "3m"
    s = load_settings(cfg, keep_alive="4m")
    assert (s.keep_alive, s.max_queue, s.max_loaded_models) == ("4m", 7, 5)
    monkeypatch.setenv("RESIDENCY_CONFIG", str(cfg))
    assert load_settings().max_queue == 7


def test_toml_models_with_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    cfg = tmp_path / "residency.toml"
    cfg.write_text(
        """
keep_alive = 300
[[models]]
name = "small"
path = "models/small.gguf"
ctx = 2048
keep_alive = -1
pinned = true

[[models]]
name = "vllm"
path = "org/model"
runner = "command"
command = ["vllm", "serve", "{model}", "--port", "{port}"]
health_path = "/health"
env = { VLLM_USE_V1 = "1" }
"""
    )
    s = load_settings(cfg)
    assert s.keep_alive_ns() == 300 * 10**9
    small, vllm = s.models
    assert small.path == tmp_path / "models" / "small.gguf"
    assert (small.ctx, small.keep_alive, small.pinned, small.runner) == (
        2048,
        "-1",
        True,
        "auto",
    )
    assert vllm.command == ["vllm", "serve", "{model}", "--port", "{port}"]
    assert vllm.env == {"VLLM_USE_V1": "1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keep_alive = [", "not valid TOML"),
        ("no_such_setting = 1", "no_such_setting: Extra inputs are not permitted"),
        ('keep_alive = "soon"', "keep_alive: keep_alive 'soon' is not a duration"),
        (
            "max_loaded_models = 0",
            r"max_loaded_models \(RESIDENCY_MAX_LOADED_MODELS, OLLAMA_MAX_LOADED_MODELS\): "
            "Input should be greater than 0",
        ),
        ('policy = "random"', "unknown policy 'random'"),
        ('[[models]]\nname = "x"\npath = "x"\nrunner = "command"', "needs a `command` template"),
        ('[[models]]\nname = "x"\npath = "x"\nctx = -1', "models.0.ctx"),
        ('[[models]]\nname = "x"\npath = "a"\n[[models]]\nname = "x"\npath = "b"', "twice"),
    ],
)
def test_bad_config_is_a_precise_config_error(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(cfg)
    assert str(cfg) in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_bad_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_MAX_QUEUE", "lots")
    with pytest.raises(ConfigError, match="max_queue"):
        load_settings()


# ---- registry --------------------------------------------------------------------------------
def test_no_models_means_the_embedded_gemma() -> None:
    reg = Registry.from_settings(load_settings())
    [entry] = reg.entries()
    assert entry.name == DEFAULT_MODEL_NAME
    assert entry.path == default_model_path()
    assert entry.runner == "auto"  # llama-server when one is found, else llama-cpp-python
    assert entry.details["format"] == "gguf"
    assert entry.details["family"] == "gemma3"
    assert entry.details["parameter_size"] == "270M"
    assert entry.details["quantization_level"] == "Q4_K_M"
    assert entry.context_length == 32768
    assert entry.size_bytes == default_model_path().stat().st_size
    assert len(entry.digest) == 64


def test_names_resolve_with_and_without_latest(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"not gguf")
    reg = Registry.from_settings(
        load_settings(
            models=[ModelConfig(name="mine", path=f), ModelConfig(name="x:latest", path=f)]
        )
    )
    assert reg.resolve("mine").name == "mine"
    assert reg.resolve("mine:latest").name == "mine"
    assert reg.resolve("x").name == "x:latest"
    assert reg.resolve("mine").details == {"format": "unknown"}
    with pytest.raises(ModelNotFoundError, match=r"'other' not found \(configured models: mine, x"):
        reg.resolve("other")


def test_models_dir_adds_every_gguf(tmp_path: Path) -> None:
    gguf = default_model_path()
    d = tmp_path / "models"
    d.mkdir()
    (d / "gemma-small.gguf").symlink_to(gguf)
    (d / "notes.txt").write_text("ignored")
    explicit = ModelConfig(name="gemma-small", path=gguf, ctx=1024)
    reg = Registry.from_settings(load_settings(models_dir=d, models=[explicit]))
    [entry] = reg.entries()
    assert entry.config.ctx == 1024  # an explicit entry wins over the directory's file
    reg = Registry.from_settings(load_settings(models_dir=d))
    assert [e.name for e in reg.entries()] == ["gemma-small"]
    with pytest.raises(ConfigError, match="not a directory"):
        Registry.from_settings(load_settings(models_dir=tmp_path / "missing"))


def test_a_missing_model_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'gone': file .* does not exist"):
        make_entry(ModelConfig(name="gone", path=tmp_path / "gone.gguf"))
    # A command runner's "path" may be a model id, not a file.
    entry = make_entry(
        ModelConfig(name="hf", path=Path("org/model"), runner="command", command=["x"])
    )
    assert entry.size_bytes == 0


def test_gguf_header_reader_against_the_gguf_writer(tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType

    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(1024)
    w.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    w.add_token_list(["a", "bb", "ccc"] * 1000)
    w.add_chat_template("{{ messages }}")
    w.add_tensor("blk.0.w", np.zeros((3, 4), dtype=np.float32))
    w.add_tensor("out", np.zeros((5,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    kv, n_params = read_gguf_header(path)
    assert kv["general.architecture"] == "llama"
    assert kv["llama.context_length"] == 1024
    assert "tokenizer.ggml.tokens" in kv
    assert n_params == 17
    details = gguf_details(path)
    assert details["family"] == "llama"
    assert details["context_length"] == 1024
    assert details["quantization_level"] == "Q8_0"
    assert details["parameter_size"] == "17"
    assert details["has_chat_template"] is True
    # Cut short: listed as unknown, never an exception.
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    assert gguf_details(cut) == {"format": "unknown"}
    with pytest.raises(ValueError, match="truncated"):
        read_gguf_header(cut)


def test_one_gguf_parse_serves_registry_show_and_estimator(tmp_path: Path) -> None:
    """The registry, /api/show and the estimator read a file version's header once, together."""
    import os

    from gguf import GGUFWriter

    from residency.estimate import read_model
    from residency.gguf_header import read_header
    from residency.registry import model_info

    path = tmp_path / "shared.gguf"

    def write(ctx: int) -> None:
        w = GGUFWriter(str(path), "llama")
        w.add_context_length(ctx)
        w.add_block_count(1)
        w.add_embedding_length(8)
        w.add_head_count(2)
        w.add_token_list([f"t{i}" for i in range(5000)])  # longer than what is always read
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(1024)
    header = read_header(path)
    assert read_header(path) is header  # cached: parsed once
    assert header.array_lengths["tokenizer.ggml.tokens"] == 5000
    assert header.metadata["tokenizer.ggml.tokens"] == []  # long arrays skipped, counted
    info, _ = model_info(path, verbose=False)
    assert info["llama.context_length"] == 1024
    assert info["tokenizer.ggml.tokens"] is None  # null unless verbose, as Ollama
    verbose, _ = model_info(path, verbose=True)
    assert verbose["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
    assert read_model(path).n_vocab == 5000
    write(2048)  # a new version of the file is read again
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert read_header(path).metadata["llama.context_length"] == 2048
