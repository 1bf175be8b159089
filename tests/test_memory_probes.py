"""Memory probes: host against /proc/meminfo; cuda and nvml through dlopen (the real libraries when
a GPU is present, "unavailable" cleanly when not, and test-built stand-ins for the loading path);
the simulated device's lag shapes, injected errors and dead-owner reclamation across processes;
and the ``residency devices`` command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from residency import memory
from residency.errors import ConfigError, InvalidArgumentError
from residency.memory import (
    DeviceInfo,
    DeviceOutOfMemoryError,
    ProbeError,
    ProbeUnavailableError,
    SimulatedDevice,
    discover_devices,
    open_probe,
    select_probe,
)

GIB = 2**30
MIB = 2**20


def meminfo_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0])
    return out


# ---------------------------------------------------------------- host


def test_host_probe_matches_proc_meminfo() -> None:
    probe = open_probe("host")
    assert probe.backend == "host"
    assert probe.device_count() == 1
    info = probe.query(0)
    expected = meminfo_kib()
    assert info.total_bytes == expected["MemTotal"] * 1024
    # MemAvailable moves between two reads; a few hundred MiB is generous on a busy machine.
    assert abs(info.free_bytes - expected["MemAvailable"] * 1024) < 256 * MIB
    assert 0 < info.free_bytes <= info.total_bytes


def test_host_probe_reads_the_file_it_is_given(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:        1000 kB\nMemFree:   10 kB\nMemAvailable:     600 kB\n")
    info = memory.open_host_probe(str(f)).query(0)
    assert (info.free_bytes, info.total_bytes) == (600 * 1024, 1000 * 1024)


def test_host_probe_errors_are_precise(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal: 1000 kB\n")
    with pytest.raises(ProbeError, match="no MemTotal/MemAvailable"):
        memory.open_host_probe(str(f))
    with pytest.raises(ProbeError, match="cannot open"):
        memory.open_host_probe(str(tmp_path / "missing"))
    with pytest.raises(ProbeError, match="out of range"):
        open_probe("host").query(1)


# ---------------------------------------------------------------- cuda / nvml, real libraries


@pytest.mark.parametrize("backend", ["cuda", "nvml"])
def test_gpu_probes_work_or_say_clearly_why_not(backend: str) -> None:
    try:
        probe = open_probe(backend)
    except ProbeUnavailableError as e:  # no GPU (CI): a clean, specific error
        message = str(e)
    else:
        message = ""
    if message:
        assert message.startswith(f"{backend} probe unavailable: ")
        return
    assert probe.backend == backend
    assert probe.device_count() >= 1
    info = probe.query(0)
    assert 0 < info.free_bytes <= info.total_bytes


@pytest.mark.parametrize(
    ("opener", "lib"), [(memory.open_cuda_probe, "libcudart"), (memory.open_nvml_probe, "nvml")]
)
def test_a_missing_library_is_unavailable_and_named(opener: object, lib: str) -> None:
    with pytest.raises(ProbeUnavailableError, match=r"/nonexistent/libx\.so") as err:
        opener(["/nonexistent/libx.so"])  # type: ignore[operator]
    assert lib in str(err.value)


def test_auto_picks_the_first_usable_backend_and_says_why_it_skipped_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    probe, notes = select_probe("auto")
    order = ["nvml", "cuda", "host"]  # nvml first: no CUDA context in residency's process
    assert probe.backend in order
    skipped = order[: order.index(probe.backend)]
    assert [n.split(" ", 1)[0] for n in notes] == skipped
    for name in skipped:
        with pytest.raises(ProbeUnavailableError):
            open_probe(name)


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown memory probe 'rocm'"):
        open_probe("rocm")
    with pytest.raises(ConfigError, match="simulated_path"):
        open_probe("simulated")


def test_cudart_candidates_prefer_wheels_and_cuda_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lib64").mkdir()
    lib = tmp_path / "lib64" / "libcudart.so.12"
    lib.write_bytes(b"")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    found = memory.cudart_candidates()
    assert str(lib) in found
    assert found.index(str(lib)) < found.index("libcudart.so")


# ---------------------------------------------------------------- cuda / nvml, dlopen path

FAKE_CUDART = r"""
#include <stddef.h>
#include <string.h>
static int current = 0;
int cudaGetDeviceCount(int* n) { *n = 2; return 0; }
int cudaGetDevice(int* d) { *d = current; return 0; }
int cudaSetDevice(int d) { if (d < 0 || d > 1) return 101; current = d; return 0; }
int cudaMemGetInfo(size_t* f, size_t* t) {
  if (current == 1) return 2;
  *f = (size_t)3 << 30; *t = (size_t)8 << 30; return 0;
}
const char* cudaGetErrorString(int rc) { return rc == 2 ? "out of memory" : "other"; }
int cudaGetDeviceProperties_v2(void* p, int d) {
  strcpy((char*)p, d == 0 ? "Test GPU 0" : "Test GPU 1"); return 0;
}
"""

FAKE_NVML = r"""
#include <string.h>
typedef struct { unsigned long long total, free, used; } mem_t;
static int inited = 0;
int nvmlInit_v2(void) { inited++; return 0; }
int nvmlShutdown(void) { inited--; return 0; }
int nvmlDeviceGetCount_v2(unsigned* n) { *n = 1; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned i, void** h) { *h = (void*)(long)(i + 1); return 0; }
int nvmlDeviceGetMemoryInfo(void* h, mem_t* m) {
  m->total = 16ULL << 30; m->free = 5ULL << 30; m->used = 11ULL << 30; return 0;
}
int nvmlDeviceGetName(void* h, char* buf, unsigned n) {
  strncpy(buf, "Test NVML GPU", n); return 0;
}
const char* nvmlErrorString(int rc) { return "nvml error"; }
"""


def build_library(tmp_path: Path, name: str, source: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in library")
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    out = tmp_path / f"{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return str(out)


def test_cuda_probe_loads_the_runtime_and_reports_per_device(tmp_path: Path) -> None:
    lib = build_library(tmp_path, "libcudart_stand_in", FAKE_CUDART)
    probe = memory.open_cuda_probe(["/nonexistent/libcudart.so", lib])
    assert probe.backend == "cuda"
    assert probe.device_count() == 2
    assert [probe.device_name(i) for i in range(2)] == ["Test GPU 0", "Test GPU 1"]
    info = probe.query(0)
    assert (info.free_bytes, info.total_bytes) == (3 * GIB, 8 * GIB)
    with pytest.raises(ProbeError, match=r"cudaMemGetInfo on device 1 failed: out of memory"):
        probe.query(1)
    with pytest.raises(ProbeError, match="device 1"):
        discover_devices(probe)  # one broken GPU is reported, not skipped silently


def test_nvml_probe_loads_the_library_and_reports(tmp_path: Path) -> None:
    lib = build_library(tmp_path, "libnvml_stand_in", FAKE_NVML)
    probe = memory.open_nvml_probe([lib])
    assert probe.backend == "nvml"
    assert probe.device_count() == 1
    assert probe.device_name(0) == "Test NVML GPU"
    info = probe.query(0)
    assert (info.free_bytes, info.total_bytes) == (5 * GIB, 16 * GIB)
    [dev] = discover_devices(probe)
    assert dev == DeviceInfo("cuda:0", 0, "Test NVML GPU", 16 * GIB, 5 * GIB, "nvml")


# ---------------------------------------------------------------- simulated device


@pytest.fixture
def sim_path(tmp_path: Path) -> Path:
    return tmp_path / "gpu.sim"


def free_of(dev: SimulatedDevice) -> int:
    return dev.query(0).free_bytes


def test_allocations_take_memory_and_frees_return_it(sim_path: Path) -> None:
    dev = SimulatedDevice.create(sim_path, 10 * GIB)
    assert dev.backend == "simulated"
    assert dev.device_count() == 1
    assert free_of(dev) == 10 * GIB
    a = dev.allocate(3 * GIB)
    b = dev.allocate(2 * GIB)
    assert a != b
    assert free_of(dev) == 5 * GIB
    dev.free(a)  # lag 0: back at once
    assert free_of(dev) == 8 * GIB
    with pytest.raises(InvalidArgumentError, match="not allocated"):
        dev.free(a)
    with pytest.raises(DeviceOutOfMemoryError, match="out of memory allocating"):
        dev.allocate(9 * GIB)
    assert [x.handle for x in dev.allocations()] == [b]


def test_fixed_lag_returns_everything_at_once_after_the_lag(sim_path: Path) -> None:
    dev = SimulatedDevice.create(sim_path, 10 * GIB, lag_s=0.2)
    assert dev.lag == ("fixed", 0.2, 0.2)
    h = dev.allocate(4 * GIB)
    t0 = time.monotonic_ns()
    dev.free(h)
    [alloc] = dev.allocations()
    assert alloc.releasing
    assert alloc.release_end_ns == alloc.release_start_ns
    assert 0.2e9 <= alloc.release_end_ns - t0 <= 0.25e9
    assert free_of(dev) == 6 * GIB  # freed, but not yet reported
    # A real driver would fail an allocation that needs the not-yet-reported memory.
    with pytest.raises(DeviceOutOfMemoryError):
        dev.allocate(7 * GIB)
    time.sleep(max(0.0, (alloc.release_end_ns - time.monotonic_ns()) / 1e9) + 0.01)
    assert free_of(dev) == 10 * GIB
    assert dev.allocations() == []


def test_random_lag_draws_each_free_from_the_range(sim_path: Path) -> None:
    dev = SimulatedDevice.create(sim_path, 100 * GIB, lag_s=(0.5, 1.5), seed=7)
    assert dev.lag == ("random", 0.5, 1.5)
    handles = [dev.allocate(GIB) for _ in range(50)]
    lags = []
    for h in handles:
        t0 = time.monotonic_ns()
        dev.free(h)
        end = next(a for a in dev.allocations() if a.handle == h).release_end_ns
        assert end is not None
        lags.append((end - t0) / 1e9)
    assert all(0.5 <= lag <= 1.51 for lag in lags)
    assert max(lags) - min(lags) > 0.5  # spread over the range, not one value
    assert len({round(x, 3) for x in lags}) > 40


def test_gradual_lag_returns_memory_linearly(sim_path: Path) -> None:
    dev = SimulatedDevice.create(sim_path, 10 * GIB, lag_s=(0.1, 0.5), lag="gradual")
    h = dev.allocate(8 * GIB)
    dev.free(h)
    [a] = dev.allocations()
    assert a.release_start_ns is not None
    assert a.release_end_ns is not None
    assert (a.release_end_ns - a.release_start_ns) == pytest.approx(0.4e9, abs=1e6)
    assert free_of(dev) == 2 * GIB  # before the window opens
    mid = a.release_start_ns + 200_000_000
    time.sleep(max(0.0, (mid - time.monotonic_ns()) / 1e9))
    t = time.monotonic_ns()
    got = free_of(dev) - 2 * GIB
    expected = 8 * GIB * (t - a.release_start_ns) / (a.release_end_ns - a.release_start_ns)
    assert got == pytest.approx(expected, abs=0.1 * 8 * GIB)
    assert 0 < got < 8 * GIB
    time.sleep(max(0.0, (a.release_end_ns - time.monotonic_ns()) / 1e9) + 0.01)
    assert free_of(dev) == 10 * GIB


def test_never_lag_keeps_freed_memory_reported_as_used(sim_path: Path) -> None:
    dev = SimulatedDevice.create(sim_path, 10 * GIB, lag="never")
    h = dev.allocate(4 * GIB)
    dev.free(h)
    time.sleep(0.05)
    assert free_of(dev) == 6 * GIB
    [a] = dev.allocations()
    assert a.releasing
    assert a.release_end_ns is None


def test_set_lag_applies_to_later_frees(sim_path: Path) -> None:
    dev = SimulatedDevice.create(sim_path, 10 * GIB, lag="never")
    a = dev.allocate(GIB)
    dev.set_lag(0.0)
    assert dev.lag == ("fixed", 0.0, 0.0)
    b = dev.allocate(GIB)
    dev.free(b)
    assert free_of(dev) == 9 * GIB
    dev.free(a)
    assert free_of(dev) == 10 * GIB


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lag_s": -1.0}, ">= 0"),
        ({"lag_s": (0.5, 0.1)}, "low <= high"),
        ({"lag_s": (0.1, 0.2), "lag": "fixed"}, "fixed lag takes one number"),
        ({"lag_s": 0.5, "lag": "random"}, r"\(low, high\)"),
        ({"lag_s": (0.1, 0.2, 0.3)}, r"\(low, high\)"),
        ({"lag": "sometimes"}, "unknown lag shape 'sometimes'"),
    ],
)
def test_bad_lag_settings_are_rejected(
    sim_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        SimulatedDevice.create(sim_path, GIB, **kwargs)  # type: ignore[arg-type]


def test_injected_errors_fail_queries_then_stop(sim_path: Path) -> None:
    dev = SimulatedDevice.create(sim_path, GIB)
    dev.fail_queries(2, "Xid 79: GPU has fallen off the bus")
    for _ in range(2):
        with pytest.raises(ProbeError, match="GPU has fallen off the bus"):
            dev.query(0)
    assert free_of(dev) == GIB
    dev.fail_queries(-1, "stuck")
    for _ in range(5):
        with pytest.raises(ProbeError, match="stuck"):
            dev.query(0)
    dev.fail_queries(0, "")
    assert free_of(dev) == GIB
    assert dev.queries == 2 + 1 + 5 + 1


def test_open_refuses_files_that_are_not_devices(tmp_path: Path) -> None:
    with pytest.raises(ProbeUnavailableError, match="No such file"):
        SimulatedDevice.open(tmp_path / "missing")
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 100)
    with pytest.raises(ProbeUnavailableError, match="not a simulated device"):
        SimulatedDevice.open(junk)


def test_open_probe_and_discovery_on_a_simulated_device(sim_path: Path) -> None:
    dev = SimulatedDevice.create(sim_path, 24 * GIB)
    dev.allocate(4 * GIB)
    probe = open_probe("simulated", simulated_path=sim_path)
    assert open_probe("auto", simulated_path=sim_path).backend == "simulated"
    [d] = discover_devices(probe)
    assert d == DeviceInfo(
        "sim:0", 0, f"simulated device ({sim_path})", 24 * GIB, 20 * GIB, "simulated"
    )


CHILD = textwrap.dedent(
    """
    import sys, time
    from residency.memory import SimulatedDevice
    dev = SimulatedDevice.open(sys.argv[1])
    dev.allocate(int(sys.argv[2]))
    print("allocated", flush=True)
    time.sleep(60)
    """
)


def spawn_allocator(path: Path, nbytes: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(nbytes)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "allocated"
    return proc


@pytest.mark.timeout(60)
def test_other_processes_share_the_device_and_a_dead_owner_is_reclaimed_with_lag(
    sim_path: Path,
) -> None:
    dev = SimulatedDevice.create(sim_path, 10 * GIB, lag_s=0.2)
    proc = spawn_allocator(sim_path, 6 * GIB)
    try:
        assert free_of(dev) == 4 * GIB
        [a] = dev.allocations()
        assert a.owner_pid == proc.pid
        assert not a.releasing
        os.kill(proc.pid, signal.SIGKILL)
        # Not reaped yet: a zombie's memory is gone already, as a driver sees it.
        deadline = time.monotonic() + 5
        while not dev.allocations()[0].releasing:
            assert time.monotonic() < deadline, "the dead owner was never noticed"
            time.sleep(0.01)
        assert free_of(dev) == 4 * GIB  # noticed, but the lag still applies
        time.sleep(0.25)
        assert free_of(dev) == 10 * GIB
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


# ---------------------------------------------------------------- residency devices


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "residency", "devices", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(120)
def test_devices_command_prints_a_table_and_json(sim_path: Path) -> None:
    SimulatedDevice.create(sim_path, 24 * GIB).allocate(4 * GIB)
    table = run_cli("--simulated-path", str(sim_path))
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["ID", "NAME", "BACKEND", "TOTAL", "FREE"]
    assert row.startswith("sim:0 ")
    assert row.rstrip().endswith("simulated  24.0 GiB  20.0 GiB")

    out = run_cli("--simulated-path", str(sim_path), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["devices"] == [
        {
            "id": "sim:0",
            "index": 0,
            "name": f"simulated device ({sim_path})",
            "total_bytes": 24 * GIB,
            "free_bytes": 20 * GIB,
            "backend": "simulated",
        }
    ]


@pytest.mark.timeout(120)
def test_devices_command_on_this_machine_and_bad_input() -> None:
    out = run_cli("--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["devices"], "auto always finds at least the host"
    expected = discover_devices(open_probe("auto"))
    assert [d["id"] for d in data["devices"]] == [d.id for d in expected]

    bad = run_cli("--backend", "simulated")
    assert bad.returncode == 1
    assert "needs simulated_path" in bad.stderr
    assert "Traceback" not in bad.stderr
