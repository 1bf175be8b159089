"""num_ctx beyond the model's training context is clamped to it, as Ollama does, with a log line;
a smaller one is kept."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from residency.config import ModelConfig, Settings
from residency.registry import make_entry
from residency.scheduler.sizing import Sizing

pytestmark = pytest.mark.timeout(30)


def _model(path: Path, trained: int) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(trained)
    writer.add_tensor("w", np.zeros((4, 3), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_num_ctx_beyond_training_is_clamped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = make_entry(ModelConfig(name="tiny", path=_model(tmp_path / "t.gguf", 4096)))
    sizing = Sizing(Settings())
    with caplog.at_level(logging.WARNING, logger="residency.scheduler"):
        assert sizing.options(entry, {"num_ctx": 32768}).ctx == 4096
    assert "num_ctx=32768 n_ctx_train=4096" in caplog.text
    caplog.clear()
    assert sizing.options(entry, {"num_ctx": 1024}).ctx == 1024
    assert caplog.text == ""
