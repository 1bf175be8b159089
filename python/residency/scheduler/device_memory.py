"""What the devices' memory says: free bytes as probed now, and the wait after victims exit until
the device really shows their memory back (drivers report freed VRAM late; the recovery watcher
polls it on its own thread without the GIL). The executor asks; this owns the probe and watcher."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from residency.errors import ModelTooLargeError, ResidencyError
from residency.memory import MemoryProbe
from residency.scheduler.sizing import gib
from residency.watcher import RecoveryOutcome, Watcher

__all__ = ["HOST_DEVICE", "DeviceMemory"]

log = logging.getLogger("residency.scheduler")

HOST_DEVICE = "host"


class DeviceMemory:
    """The probe and the recovery watcher, per scheduler device (a spread device has several
    GPUs: ``device_index`` maps each device id to its GPU indices)."""

    def __init__(
        self,
        probe: MemoryProbe | None,
        watcher: Watcher | None,
        device_index: Mapping[str, Sequence[int]],
        recovery_timeout_s: float,
    ) -> None:
        self._probe = probe
        self._watcher = watcher
        self._device_index = device_index
        self._timeout_s = recovery_timeout_s

    def indices_of(self, device: str) -> tuple[int, ...]:
        return tuple(self._device_index.get(device, (0,)))

    def free_on(self, device: str) -> int | None:
        """The device's free bytes as probed now (a spread device's: its GPUs' together)."""
        total = 0
        for index in self.indices_of(device):
            free = self.free(index)
            if free is None:
                return None
            total += free
        return total

    def free(self, index: int) -> int | None:
        if self._probe is None:
            return None
        try:
            return int(self._probe.query(index).free_bytes)
        except ResidencyError as err:
            log.warning("memory probe failed: %s", err)
            return None

    async def await_memory(
        self, key: str, device: str, free_before: int | None, expected_freed: int, needed: int
    ) -> None:
        """After victims exit, wait until the device shows their memory back (drivers report it
        late). On the host, also refuse to start a load the machine cannot hold."""
        if self._probe is None or self._watcher is None or free_before is None:
            return
        free_now = self.free_on(device)
        if expected_freed == 0:
            if free_now is None or free_now >= needed:
                return
            # Memory still held by something that exited (a crash) or by another process.
            free_before, expected_freed = free_now, needed - free_now
        members = self.indices_of(device)
        for index in members:  # a spread model's share of the memory on each of its GPUs
            share = len(members)
            before = free_before if share == 1 else self.free(index)
            if before is not None:
                await self._recovered(
                    key,
                    device,
                    index,
                    before,
                    expected=expected_freed // share,
                    needed=needed // share,
                )

    async def _recovered(
        self, key: str, device: str, index: int, free_before: int, *, expected: int, needed: int
    ) -> None:
        assert self._probe is not None
        assert self._watcher is not None
        result = await self._watcher.recovered(
            self._probe,
            index,
            free_before=free_before,
            expected_freed=expected,
            needed=needed,
            timeout_s=self._timeout_s,
        )
        outcome, last = result.outcome, result.last_free_bytes
        log.info("recovery on %s: %s after %.3f s (%d polls, %s free)", device,
                 outcome.name, result.elapsed_s, result.polls, gib(last))  # fmt: skip
        recovered = outcome == RecoveryOutcome.RECOVERED
        if not recovered and device == HOST_DEVICE and last < needed:
            # Ollama never checks CPU loads; starting one the host cannot hold invites the OOM
            # killer into every process here.
            raise ModelTooLargeError(
                f"model {key!r} needs {gib(needed)} but the host has {gib(last)} "
                f"available after waiting {self._timeout_s:g} s"
            )
