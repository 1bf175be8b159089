"""KV caches that survive eviction: llama-server slots saved before a runner stops, restored into
its successor when a request continues the saved conversation.

- **Save** (:meth:`SlotPersistence.save_all`, from the runner's stop path): every slot that holds
  a prompt is saved with ``POST /slots/{id}?action=save``, idle slots first, all within
  ``save_timeout_s`` — what is not saved by then is skipped, so an eviction a load waits for is
  delayed at most that long. A slot still generating (a request whose client went away, or whose
  answer was sent a moment before the slot was released) is saved too: llama-server defers the
  save until the slot is idle, so the wait is bounded by the same timeout.
- **Restore** (:meth:`SlotPersistence.before_send`, the runner api's hook): while saved files
  for this model and key remain unrestored, a completion's rendered prompt is compared with them;
  the longest saved prompt it extends is checked against its sidecar's size and CRC-32, restored
  into a slot nobody restored into yet, and the request is sent to that slot (``id_slot``). Once
  none remain, the hook costs nothing.
- Files, names and the disk budget: runners.kvfiles.

Any failure is logged and the request is served by a normal prefill; a file that failed is
deleted, so it is never tried again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json, to_json

from residency.runners.http import RunnerClient, TransportError
from residency.runners.kvfiles import (
    KvPersistence,
    SavedSlot,
    SlotFiles,
    cache_key,
    enforce_budget,
    without_bos,
)
from residency.runners.protocol import Body

__all__ = [
    "KV_STATS",
    "KvPersistence",
    "KvStats",
    "SlotPersistence",
    "cache_key",
    "enforce_budget",
    "kv_stats_json",
]

log = logging.getLogger(__name__)

_COMPLETIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
_JSON = {"content-type": "application/json"}


@dataclass
class KvStats:
    """Saved and restored slots per model (for /api/ps and /metrics)."""

    saved: int = 0
    saved_bytes: int = 0
    restored: int = 0
    restored_bytes: int = 0
    failed: int = 0
    #: llama-server's own timing of the latest save and restore (ms).
    last_save_ms: float = 0.0
    last_restore_ms: float = 0.0


class _Stats(dict[str, KvStats]):
    def of(self, model: str) -> KvStats:
        return self.setdefault(model, KvStats())


#: Process-wide, by model name.
KV_STATS = _Stats()


def kv_stats_json() -> dict[str, dict[str, float]]:
    """KV_STATS as /api/ps shows them."""
    return {model: dict(vars(stats)) for model, stats in sorted(KV_STATS.items())}


class SlotPersistence:
    """One llama-server runner's saves and restores, in a directory shared by every runner."""

    def __init__(
        self, client: RunnerClient, *, model: str, key: str, config: KvPersistence, slots: int
    ) -> None:
        self._client = client
        self.model = model
        self.config = config
        self.directory = config.directory
        self.files = SlotFiles(config.directory, model, key)
        self._slots = slots
        self._candidates: list[SavedSlot] | None = None  # read at the first request
        self._restored_slots: set[int] = set()
        self._lock = asyncio.Lock()

    # ---- save -----------------------------------------------------------------------------------
    async def save_all(self) -> int:
        """Saves every slot holding a prompt, within save_timeout_s. Returns slots saved."""
        budget = self.config.save_timeout_s
        if budget <= 0:
            return 0
        try:
            return await asyncio.wait_for(self._save_all(), budget)
        except asyncio.TimeoutError:
            log.warning("%s: saving slots took over %g s: the rest skipped", self.model, budget)
        except (TransportError, OSError, ValueError) as err:
            KV_STATS.of(self.model).failed += 1
            log.warning("%s: saving slots failed (%s): the next load prefills", self.model, err)
        return 0

    async def _save_all(self) -> int:
        resp = await self._client.get("/slots")
        if resp.status != 200:
            raise ValueError(f"GET /slots answered {resp.status}")
        slots = from_json(resp.content)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Idle slots first: a slot still generating is saved once it stops (llama-server defers
        # the save), and must not use up the time the idle ones need.
        held = sorted(
            (s for s in (slots if isinstance(slots, list) else ()) if s.get("prompt")),
            key=lambda s: bool(s.get("is_processing")),
        )
        saved = 0
        for slot in held:
            if slot.get("is_processing"):
                log.info("%s: slot %s is still generating: saving it when it stops",
                         self.model, slot["id"])  # fmt: skip
            elif not slot.get("n_prompt_tokens"):
                continue  # an idle slot that holds nothing
            saved += await self._save_slot(int(slot["id"]), str(slot["prompt"]))
        if saved:
            enforce_budget(self.directory, self.config.budget_bytes)
        return saved

    async def _save_slot(self, slot: int, prompt: str) -> int:
        file = self.files.name_for(prompt)
        t0 = time.monotonic()
        resp = await self._client.request(
            "POST", f"/slots/{slot}?action=save", body=to_json({"filename": file}), headers=_JSON
        )
        stats = KV_STATS.of(self.model)
        if resp.status != 200:
            stats.failed += 1
            log.warning("%s: slot %d not saved (HTTP %d): %s", self.model, slot, resp.status,
                        resp.content[:200])  # fmt: skip
            return 0
        answer = from_json(resp.content)
        if not answer.get("n_saved"):
            (self.directory / file).unlink(missing_ok=True)  # the slot was emptied meanwhile
            return 0
        size = await asyncio.to_thread(self.files.record, file, prompt, answer.get("n_saved"))
        stats.saved += 1
        stats.saved_bytes += size
        stats.last_save_ms = float((answer.get("timings") or {}).get("save_ms") or 0.0)
        log.info("%s: saved slot %d (%s tokens, %d bytes) in %.0f ms", self.model, slot,
                 answer.get("n_saved"), size, (time.monotonic() - t0) * 1000)  # fmt: skip
        return 1

    # ---- restore --------------------------------------------------------------------------------
    async def before_send(self, path: str, body: Body) -> Body | None:
        """The request body to send instead (pinned to a restored slot), or None."""
        if self._candidates is not None and not self._candidates:
            return None  # the common case: nothing (left) to restore, nothing to do
        kind = _COMPLETIONS.get(path)
        if kind is None:
            return None
        async with self._lock:
            if self._candidates is None:
                self._candidates = self.files.candidates()
            if not self._candidates or len(self._restored_slots) >= self._slots:
                self._candidates = []
                return None
            fields = dict(from_json(body)) if isinstance(body, bytes) else dict(body)
            if "id_slot" in fields:
                return None
            try:
                text = await self._rendered(kind, fields)
            except (TransportError, ValueError) as err:
                log.info("%s: cannot render the prompt to match saved slots (%s)", self.model, err)
                return None
            if text is None:
                return None
            text = without_bos(text)
            matches = [c for c in self._candidates if text.startswith(without_bos(c.prompt))]
            if not matches:
                return None
            best = max(matches, key=lambda c: len(c.prompt))
            self._candidates.remove(best)
            slot = min(set(range(self._slots)) - self._restored_slots)
            if not await self._restore(best, slot):
                return None
            self._restored_slots.add(slot)
            fields["id_slot"] = slot
            return fields

    async def _rendered(self, kind: str, fields: Mapping[str, Any]) -> str | None:
        if kind == "text":
            prompt = fields.get("prompt")
            return prompt if isinstance(prompt, str) else None
        payload = {"messages": fields.get("messages") or []}
        for extra in ("tools", "chat_template_kwargs"):
            if extra in fields:
                payload[extra] = fields[extra]
        resp = await self._client.request(
            "POST", "/apply-template", body=to_json(payload), headers=_JSON, timeout_s=5.0
        )
        if resp.status != 200:
            return None
        prompt = from_json(resp.content).get("prompt")
        return prompt if isinstance(prompt, str) else None

    async def _restore(self, saved: SavedSlot, slot: int) -> bool:
        stats = KV_STATS.of(self.model)
        if not await asyncio.to_thread(self.files.intact, saved):
            # A truncated file (a save cut short, a full disk) aborts llama-server on restore.
            return self._failed(saved, "its size or CRC-32 differs from what was saved")
        try:
            resp = await self._client.request(
                "POST",
                f"/slots/{slot}?action=restore",
                body=to_json({"filename": saved.file}),
                headers=_JSON,
                timeout_s=max(self.config.save_timeout_s, 5.0),
            )
        except TransportError as err:
            return self._failed(saved, str(err))
        if resp.status != 200:
            return self._failed(saved, f"HTTP {resp.status}: {resp.content[:200]!r}")
        answer = from_json(resp.content)
        stats.restored += 1
        stats.restored_bytes += int(answer.get("n_read") or 0)
        stats.last_restore_ms = float((answer.get("timings") or {}).get("restore_ms") or 0.0)
        self.files.touch(saved)
        log.info("%s: restored %s tokens into slot %d from %s", self.model,
                 answer.get("n_restored"), slot, saved.file)  # fmt: skip
        return True

    def _failed(self, saved: SavedSlot, why: str) -> bool:
        """A file that failed once is deleted: it would fail (or worse) every time."""
        KV_STATS.of(self.model).failed += 1
        self.files.drop(saved)
        log.warning("%s: restoring %s failed (%s): prefilling instead", self.model, saved.file,
                    why)  # fmt: skip
        return False
