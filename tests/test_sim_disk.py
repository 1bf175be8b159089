"""The simulator's shared disk: loads split its bandwidth, prefetches read only while it is idle."""

from __future__ import annotations

import pytest

from residency.sim.disk import NS, Disk

MB = 1_000_000


def test_one_read_alone_takes_bytes_over_bandwidth() -> None:
    d = Disk(100 * MB)
    d.start("a", 200 * MB, 0, background=False)
    assert d.next_done() == (2 * NS, "a")


def test_two_loads_share_the_disk_and_the_first_to_finish_frees_it() -> None:
    d = Disk(100 * MB)
    d.start("a", 100 * MB, 0, background=False)
    d.start("b", 300 * MB, 0, background=False)
    at, job = d.next_done()  # type: ignore[misc]
    assert (at, job) == (2 * NS, "a")  # 100 MB at 50 MB/s
    assert d.finish("a", at) == pytest.approx(100 * MB)
    assert d.read("b", at) == pytest.approx(100 * MB)
    assert d.next_done() == (4 * NS, "b")  # the remaining 200 MB alone


def test_a_prefetch_waits_while_a_load_reads() -> None:
    d = Disk(100 * MB)
    d.start("prefetch", 100 * MB, 0, background=True)
    assert d.read("prefetch", NS // 2) == pytest.approx(50 * MB)
    d.start("load", 100 * MB, NS // 2, background=False)
    assert d.read("prefetch", NS) == pytest.approx(50 * MB)  # the load has the disk
    assert d.next_done() == (3 * NS // 2, "load")
    d.finish("load", 3 * NS // 2)
    assert d.next_done() == (2 * NS, "prefetch")  # the other half, once the disk is idle


def test_every_change_bumps_the_version_and_a_missing_job_read_nothing() -> None:
    d = Disk(100 * MB)
    v = d.version
    d.start("a", MB, 0, background=False)
    assert d.version == v + 1
    assert d.finish("missing", 0) == 0.0
    assert d.version == v + 1
    assert d.read("missing", 0) == 0.0
