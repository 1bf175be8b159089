"""Models found on disk with no configuration: Ollama's store, the Hugging Face cache, models_dir
(recursively); precedence, duplicates, and noticing changes without a restart."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from estimate_models import write_llama
from model_stores import write_hf_repo, write_ollama_model
from residency.catalog import DiscoveredModels
from residency.config import ModelConfig, Settings
from residency.discovery import ollama_name, ollama_store
from residency.errors import ModelNotFoundError
from residency.registry import Registry, make_entry

GEMMA_PARAMS = {"stop": ["<end_of_turn>"], "temperature": 1, "top_k": 64, "top_p": 0.95}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ggufs")
    tiny = {"n_layer": 1, "n_embd": 64, "n_head": 2, "n_head_kv": 1, "n_ff": 128, "n_vocab": 300}
    return {
        "a": write_llama(d / "a.gguf", **tiny, seed=1),  # type: ignore[arg-type]
        "b": write_llama(d / "b.gguf", **tiny, seed=2),  # type: ignore[arg-type]
        "c": write_llama(d / "c.gguf", arch="qwen2", **tiny, seed=3),  # type: ignore[arg-type]
    }


def _settings(tmp_path: Path, **kw: object) -> Settings:
    kw.setdefault("ollama_models", tmp_path / "ollama")
    kw.setdefault("hf_cache", tmp_path / "hf")
    return Settings(discover=True, **kw)  # type: ignore[arg-type]


def test_ollama_store_served_with_ollamas_names_and_layers(
    tmp_path: Path, ggufs: dict[str, Path]
) -> None:
    store = tmp_path / "ollama"
    manifest = write_ollama_model(
        store,
        "gemma3:270m",
        ggufs["a"],
        params={**GEMMA_PARAMS, "num_ctx": 2048},
        system="You are terse.",
        template="{{ .Prompt }}",
        license="Gemma Terms of Use",
        projector=ggufs["c"],
    )
    write_ollama_model(store, "someone/tiny:q8", ggufs["b"])
    write_ollama_model(store, "hf.co/org/Repo-GGUF:Q8_0", ggufs["c"])
    write_ollama_model(store, "plain", ggufs["b"])  # tag latest
    registry = Registry.from_settings(_settings(tmp_path))
    names = [e.name for e in registry.entries()]
    assert names == ["gemma3:270m", "hf.co/org/Repo-GGUF:Q8_0", "plain:latest", "someone/tiny:q8"]
    gemma = registry.resolve("gemma3:270m")
    blob = store / "blobs" / f"sha256-{hashlib.sha256(ggufs['a'].read_bytes()).hexdigest()}"
    assert gemma.path == blob
    assert gemma.config.ctx == 2048  # num_ctx decides the load
    assert gemma.config.parameters == GEMMA_PARAMS  # the rest: request defaults
    assert gemma.config.system == "You are terse."
    assert gemma.config.template == "{{ .Prompt }}"
    assert gemma.config.license == "Gemma Terms of Use"
    assert len(gemma.config.projectors) == 1
    assert gemma.config.projectors[0].is_file()
    # The ID `ollama list` shows: the manifest's sha256.
    assert gemma.digest == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert gemma.details["format"] == "gguf"
    assert gemma.details["family"] == "llama"
    assert registry.resolve("plain").name == "plain:latest"
    assert registry.resolve("someone/tiny:q8").path.name.startswith("sha256-")


def test_store_is_read_only_and_bad_manifests_are_skipped(
    tmp_path: Path, ggufs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "ollama"
    write_ollama_model(store, "good:1b", ggufs["a"])
    bad = store / "manifests" / "registry.ollama.ai" / "library"
    (bad / "hostile").mkdir(parents=True)
    (bad / "hostile" / "x").write_text(
        '{"layers": [{"mediaType": "application/vnd.ollama.image.model",'
        ' "digest": "sha256:../../../etc/passwd", "size": 1}]}'
    )
    (bad / "broken").mkdir()
    (bad / "broken" / "x").write_text("{not json")
    missing = write_ollama_model(store, "gone:1b", ggufs["b"])
    blob = store / "blobs" / f"sha256-{hashlib.sha256(ggufs['b'].read_bytes()).hexdigest()}"
    blob.unlink()
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in store.rglob("*") if p.is_file()}
    with caplog.at_level(logging.WARNING, logger="residency.discovery"):
        registry = Registry.from_settings(_settings(tmp_path))
    assert [e.name for e in registry.entries()] == ["good:1b"]
    assert "not a sha256 digest" in caplog.text
    assert "blob" in caplog.text
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in store.rglob("*") if p.is_file()}
    assert before == after
    assert missing.exists()


def test_ollama_names() -> None:
    assert ollama_name(("registry.ollama.ai", "library", "gemma3", "270m")) == "gemma3:270m"
    assert ollama_name(("registry.ollama.ai", "user", "m", "t")) == "user/m:t"
    assert ollama_name(("hf.co", "org", "repo", "Q4_K_M")) == "hf.co/org/repo:Q4_K_M"
    assert ollama_name(("too", "short")) is None


def test_store_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    service_store = Path("/usr/share/ollama/.ollama/models")
    assert ollama_store(Settings()) in (None, service_store)
    (tmp_path / ".ollama" / "models" / "manifests").mkdir(parents=True)
    assert ollama_store(Settings(ollama_models=None)) == tmp_path / ".ollama" / "models"
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "elsewhere"))
    assert ollama_store(Settings()) == tmp_path / "elsewhere"
    monkeypatch.setenv("RESIDENCY_OLLAMA_MODELS", str(tmp_path / "ours"))
    assert ollama_store(Settings()) == tmp_path / "ours"


def test_hf_cache_as_hf_co_names(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    write_hf_repo(
        tmp_path / "hf",
        "unsloth/gemma-3-270m-it-GGUF",
        {
            "gemma-3-270m-it-Q4_K_M.gguf": ggufs["a"],
            "gemma-3-270m-it-UD-Q8_K_XL.gguf": ggufs["b"],
            "mmproj-F16.gguf": ggufs["c"],
            "big/big-Q8_0-00001-of-00002.gguf": ggufs["a"],
            "big/big-Q8_0-00002-of-00002.gguf": ggufs["b"],
            "README.md": ggufs["c"],
        },
    )
    write_hf_repo(tmp_path / "hf", "org/single", {"model.gguf": ggufs["c"]})
    registry = Registry.from_settings(_settings(tmp_path))
    names = [e.name for e in registry.entries()]
    assert names == [
        "hf.co/org/single:latest",
        "hf.co/unsloth/gemma-3-270m-it-GGUF:Q4_K_M",
        "hf.co/unsloth/gemma-3-270m-it-GGUF:Q8_0",
        "hf.co/unsloth/gemma-3-270m-it-GGUF:UD-Q8_K_XL",
    ]
    q4 = registry.resolve("hf.co/unsloth/gemma-3-270m-it-GGUF:Q4_K_M")
    assert q4.path.name == "gemma-3-270m-it-Q4_K_M.gguf"
    assert q4.size_bytes == ggufs["a"].stat().st_size
    assert [p.name for p in q4.config.projectors] == ["mmproj-F16.gguf"]
    split = registry.resolve("hf.co/unsloth/gemma-3-270m-it-GGUF:Q8_0")
    assert split.path.name == "big-Q8_0-00001-of-00002.gguf"
    assert registry.resolve("hf.co/org/single").name == "hf.co/org/single:latest"


def test_models_dir_searched_recursively(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    d = tmp_path / "models"
    (d / "qwen").mkdir(parents=True)
    (d / "top.gguf").symlink_to(ggufs["a"])
    (d / "qwen" / "qwen2.5-q8.gguf").symlink_to(ggufs["c"])
    (d / "qwen" / "notes.txt").write_text("not a model")
    registry = Registry.from_settings(_settings(tmp_path, models_dir=d))
    assert [e.name for e in registry.entries()] == ["qwen/qwen2.5-q8", "top"]


def test_precedence_explicit_then_models_dir_then_ollama_then_hf(
    tmp_path: Path, ggufs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "models"
    d.mkdir()
    (d / "dup.gguf").symlink_to(ggufs["a"])
    write_ollama_model(tmp_path / "ollama", "dup:latest", ggufs["b"])
    write_ollama_model(tmp_path / "ollama", "mine:7b", ggufs["b"])
    write_ollama_model(tmp_path / "ollama", "hf.co/org/repo:Q8_0", ggufs["b"])
    write_hf_repo(tmp_path / "hf", "org/repo", {"repo-Q8_0.gguf": ggufs["c"]})
    explicit = ModelConfig(name="mine:7b", path=ggufs["c"], ctx=512)
    with caplog.at_level(logging.INFO, logger="residency.catalog"):
        found = DiscoveredModels(_settings(tmp_path, models_dir=d, models=[explicit]), make_entry)
    entries = {e.name: e for e in found.entries()}
    assert set(entries) == {"mine:7b", "dup", "hf.co/org/repo:Q8_0"}
    assert entries["mine:7b"].path == ggufs["c"]
    assert entries["mine:7b"].config.ctx == 512
    assert entries["dup"].path == d / "dup.gguf"
    assert entries["hf.co/org/repo:Q8_0"].path.parent.name == "blobs"  # Ollama's copy
    shadowed = {
        (name, kept.split(":")[0], lost.split(":")[0]) for name, kept, lost in found.shadowed
    }
    assert shadowed == {
        ("mine:7b", "config", "ollama"),
        ("dup:latest", "models_dir", "ollama"),
        ("hf.co/org/repo:Q8_0", "ollama", "huggingface"),
    }
    assert "model dup:latest: using models_dir:" in caplog.text  # shown to the operator


def test_new_and_removed_models_noticed_cheaply(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    now = [0.0]
    calls: list[str] = []

    def counting_make_entry(config: ModelConfig):  # type: ignore[no-untyped-def]
        calls.append(config.name)
        return make_entry(config)

    store = tmp_path / "ollama"
    write_ollama_model(store, "first:1b", ggufs["a"])
    found = DiscoveredModels(_settings(tmp_path), counting_make_entry, clock=lambda: now[0])
    assert calls == ["first:1b"]
    assert not found.refresh()  # within the interval: not even a stat
    now[0] += 5
    assert not found.refresh()
    assert calls == ["first:1b"]
    second = write_ollama_model(store, "second:1b", ggufs["b"])
    assert not found.refresh()  # checked 0 s ago
    now[0] += 5
    assert found.refresh()
    assert [e.name for e in found.entries()] == ["first:1b", "second:1b"]
    assert calls == ["first:1b", "second:1b"]  # the unchanged model's header is not re-read
    second.unlink()  # `ollama rm second:1b`
    now[0] += 5
    assert found.refresh()
    assert [e.name for e in found.entries()] == ["first:1b"]


def test_the_registry_sees_pulls_and_removals_from_its_watcher_thread(
    tmp_path: Path, ggufs: dict[str, Path]
) -> None:
    store = tmp_path / "ollama"
    write_ollama_model(store, "first:1b", ggufs["a"])
    registry = Registry.from_settings(_settings(tmp_path, discover_interval_s=0.05))
    try:
        with pytest.raises(ModelNotFoundError):
            registry.resolve("late:1b")
        manifest = write_ollama_model(store, "late:1b", ggufs["b"])
        deadline = time.monotonic() + 10
        while "late:1b" not in [e.name for e in registry.entries()]:
            assert time.monotonic() < deadline, "the pulled model never appeared"
            time.sleep(0.02)
        assert registry.resolve("late:1b").path.parent == store / "blobs"
        manifest.unlink()
        while "late:1b" in [e.name for e in registry.entries()]:
            assert time.monotonic() < deadline, "the removed model never went"
            time.sleep(0.02)
        with pytest.raises(ModelNotFoundError):
            registry.resolve("late:1b")
        watcher = registry._discovered._watcher  # type: ignore[union-attr]
        assert watcher is not None
    finally:
        registry.close()
    assert not watcher.is_alive()


def test_nothing_to_watch_starts_no_thread(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    write_llama(model, n_layer=1, n_embd=64, n_head=2, n_head_kv=1)
    before = threading.active_count()
    registry = Registry.from_settings(
        Settings(discover=False, models=[ModelConfig(name="m", path=model)])
    )
    assert threading.active_count() == before
    registry.close()


def test_nothing_found_serves_the_embedded_model(tmp_path: Path) -> None:
    registry = Registry.from_settings(_settings(tmp_path))
    assert [e.name for e in registry.entries()] == ["gemma3:270m"]


def test_a_manifest_rewritten_in_place_is_noticed(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    now = [0.0]
    store = tmp_path / "ollama"
    manifest = write_ollama_model(store, "m:1b", ggufs["a"])
    found = DiscoveredModels(_settings(tmp_path), make_entry, clock=lambda: now[0])
    (before,) = found.entries()
    # `ollama pull m:1b` of a newer version truncates and rewrites the same manifest file.
    newer = write_ollama_model(tmp_path / "scratch", "m:1b", ggufs["b"])
    for blob in (tmp_path / "scratch" / "blobs").iterdir():
        if not (store / "blobs" / blob.name).exists():
            blob.rename(store / "blobs" / blob.name)
    with manifest.open("r+b") as f:
        f.truncate(0)
        f.write(newer.read_bytes())
    now[0] += 5
    assert found.refresh()
    (after,) = found.entries()
    assert after.name == "m:1b"
    assert after.path != before.path
    assert after.digest == hashlib.sha256(newer.read_bytes()).hexdigest()


def test_list_local_shows_sources_and_duplicates(
    tmp_path: Path,
    ggufs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from residency.cli import main

    write_ollama_model(tmp_path / "ollama", "hf.co/org/repo:Q8_0", ggufs["a"])
    write_hf_repo(tmp_path / "hf", "org/repo", {"repo-Q8_0.gguf": ggufs["b"]})
    write_hf_repo(tmp_path / "hf", "org/other", {"other-Q4_K_M.gguf": ggufs["c"]})
    monkeypatch.setenv("RESIDENCY_DISCOVER", "1")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("RESIDENCY_HF_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("RESIDENCY_CONFIG", raising=False)
    assert main(["list", "--local"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "SOURCE"]
    assert re.search(r"^hf\.co/org/other:Q4_K_M .* huggingface:", out, re.M)
    assert re.search(r"^hf\.co/org/repo:Q8_0 .* ollama:", out, re.M)
    assert re.search(r"hf\.co/org/repo:Q8_0: huggingface:\S+ \(using ollama:", out)
    assert main(["list", "--local", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in data["models"]] == ["hf.co/org/other:Q4_K_M", "hf.co/org/repo:Q8_0"]
    (dup,) = data["shadowed"]
    assert dup["used"].startswith("ollama:")
    assert dup["shadowed"].startswith("huggingface:")
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "q9")
    assert main(["list", "--local"]) == 1
    assert "unknown KV cache type" in capsys.readouterr().err
