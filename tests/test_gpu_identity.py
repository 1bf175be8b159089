"""GPU identity (issue 14, item 8): a runner gets the physical GPU residency's probe chose, also
when residency itself runs under a CUDA_VISIBLE_DEVICES list, and ``auto`` probes with NVML
(no CUDA context in residency's process) whenever NVML's numbering is the runners' numbering.
No GPU here: the probes are replaced by recorders; the numbering rules are pure functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from residency import memory
from residency.errors import ConfigError
from residency.memory import nvml_numbering_matches, runner_gpu_environment, select_probe
from residency.runners import LaunchSpec, runner_class


@pytest.mark.parametrize(
    ("parent", "index", "expected"),
    [
        ({}, 1, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
        # residency under "2,3": its GPU 1 is physical GPU 3 (today's bug: the runner got "1").
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, 1, {"CUDA_VISIBLE_DEVICES": "3"}),
        ({"CUDA_VISIBLE_DEVICES": " 5 , 4"}, 0, {"CUDA_VISIBLE_DEVICES": "5"}),
        (
            {"CUDA_VISIBLE_DEVICES": "GPU-8f1c,GPU-77aa", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"},
            1,
            {"CUDA_VISIBLE_DEVICES": "GPU-77aa"},  # order inherited: the entry means the same
        ),
        (
            {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"},
            0,
            {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"},
        ),
    ],
)
def test_the_runner_gets_the_physical_gpu(
    parent: dict[str, str], index: int, expected: dict[str, str]
) -> None:
    assert runner_gpu_environment(index, parent) == expected


def test_an_index_outside_the_list_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="GPU 2 is not in CUDA_VISIBLE_DEVICES=0,1"):
        runner_gpu_environment(2, {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_runner_environment_maps_through_residencys_own_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    for kind in ("llama-cpp-python", "llama-server"):
        spec = LaunchSpec(
            name="m",
            model_path=Path("/models/m.gguf"),
            ctx=2048,
            parallel=1,
            kv_type="f16",
            gpu_layers=-1,
            device="cuda:1",
            device_index=1,
        )
        env = runner_class(kind)(spec).environment()
        assert env["CUDA_VISIBLE_DEVICES"] == "7", kind
        host = runner_class(kind)(LaunchSpec(**{**spec.__dict__, "device": "host"}))
        assert host.environment()["CUDA_VISIBLE_DEVICES"] == "6,7"  # untouched: no GPU use


def test_nvml_numbering_matches_only_without_a_list_in_pci_order() -> None:
    assert nvml_numbering_matches({})
    assert nvml_numbering_matches({"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert not nvml_numbering_matches({"CUDA_VISIBLE_DEVICES": "1"})
    assert not nvml_numbering_matches({"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tried: list[str] = []
        for name in ("cuda", "nvml"):
            monkeypatch.setattr(memory, f"open_{name}_probe", self._opener(name))

    def _opener(self, name: str) -> Any:
        def opener(candidates: list[str]) -> Any:
            self.tried.append(name)
            raise memory.ProbeUnavailableError(f"{name} unavailable here")

        return opener


def test_auto_probes_with_nvml_first_so_no_cuda_context_is_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    rec = Recorder(monkeypatch)
    probe, notes = select_probe("auto")
    assert rec.tried == ["nvml", "cuda"]
    assert probe.backend == "host"
    assert notes == ["nvml unavailable here", "cuda unavailable here"]
    import os

    # The cuda probe, if it had opened, would number GPUs as NVML and the runners do.
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_auto_under_a_list_probes_with_cuda_which_numbers_inside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    rec = Recorder(monkeypatch)
    probe, notes = select_probe("auto")
    assert rec.tried == ["cuda"]  # NVML would number all GPUs, ignoring the list
    assert probe.backend == "host"
    assert "renumber" in notes[0]
    import os

    assert "CUDA_DEVICE_ORDER" not in os.environ  # the list means what the user's order says
