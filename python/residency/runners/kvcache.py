"""KV caches that survive eviction: llama-server slots saved before a runner stops, restored into
its successor when a request continues the saved conversation.

- **Save** (:meth:`SlotPersistence.save_all`, from the runner's stop path): every idle slot that
  holds a prompt is saved with ``POST /slots/{id}?action=save``, all of it within
  ``save_timeout_s`` — what is not saved by then is skipped, so an eviction a load waits for is
  delayed at most that long.
- **Names**: ``<model>-<key>-<prefix>.bin``: the model's name, a hash of what makes a cache
  reusable (the model file's path, size and mtime; the slot's context, KV type and extra args),
  and a hash of the cached prompt. A sidecar ``.json`` holds the prompt text and sizes.
- **Restore** (:meth:`SlotPersistence.before_send`, the runner api's hook): while saved files
  for this model and key remain unrestored, a completion's rendered prompt is compared with them;
  the longest saved prompt it extends is restored into a slot nobody restored into yet, and the
  request is sent to that slot (``id_slot``). Once none remain, the hook costs nothing.
- **Budget**: beyond ``budget_bytes`` the least recently used files go; files of the same model
  with another key (a changed file or options) go when a runner for the model starts.

Any failure is logged and the request is served by a normal prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_core import from_json, to_json

from residency.runners.http import RunnerClient, TransportError
from residency.runners.protocol import Body

__all__ = [
    "KV_STATS",
    "KvPersistence",
    "KvStats",
    "SlotPersistence",
    "cache_key",
    "kv_stats_json",
]

log = logging.getLogger(__name__)

_COMPLETIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
_JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class KvPersistence:
    """One llama-server runner's KV persistence (its LaunchSpec's ``kv``; runners.choice makes
    it from the settings): where slots are saved, how many bytes may stay, how long a stop waits."""

    directory: Path
    #: Files beyond this many bytes are removed, least recently used first.
    budget_bytes: int = 4 << 30
    #: The longest a stop waits for saves; what is unsaved by then is skipped (see README).
    save_timeout_s: float = 5.0


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


def cache_key(model_path: Path, *, ctx: int, kv_type: str, args: tuple[str, ...]) -> str:
    """What makes a saved slot reusable: the same model file and the same cache layout."""
    try:
        st = model_path.stat()
        file_id = f"{model_path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    except OSError:
        file_id = str(model_path)
    text = f"{file_id}\0{ctx}\0{kv_type.lower()}\0{' '.join(args)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    """A model name as llama-server accepts in a file name (letters, digits, . _ -)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "model"


def _without_bos(text: str) -> str:
    # A slot's prompt is detokenized with its BOS; a rendered template may or may not carry one.
    return text.removeprefix("<bos>").removeprefix("<s>")


@dataclass(frozen=True)
class _Saved:
    file: str
    prompt: str
    size: int


class SlotPersistence:
    """One llama-server runner's saves and restores, in a directory shared by every runner."""

    def __init__(
        self, client: RunnerClient, *, model: str, key: str, config: KvPersistence, slots: int
    ) -> None:
        self._client = client
        self.model = model
        self.key = key
        self.config = config
        self.directory = config.directory
        self._slots = slots
        self._prefix = f"{_safe(model)}-{key}-"
        self._candidates: list[_Saved] | None = None  # read at the first request
        self._restored_slots: set[int] = set()
        self._lock = asyncio.Lock()

    # ---- save -----------------------------------------------------------------------------------
    async def save_all(self) -> int:
        """Saves every idle slot holding a prompt, within save_timeout_s. Returns slots saved."""
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
        saved = 0
        for slot in slots if isinstance(slots, list) else ():
            prompt = slot.get("prompt")
            if slot.get("is_processing") or not prompt or not slot.get("n_prompt_tokens"):
                continue
            saved += await self._save_slot(int(slot["id"]), str(prompt))
        if saved:
            self.enforce_budget()
        return saved

    async def _save_slot(self, slot: int, prompt: str) -> int:
        digest = hashlib.sha256(_without_bos(prompt).encode()).hexdigest()[:16]
        file = f"{self._prefix}{digest}.bin"
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
        size = int(answer.get("n_written") or 0)
        meta = {"model": self.model, "key": self.key, "prompt": prompt,
                "tokens": answer.get("n_saved"), "bytes": size}  # fmt: skip
        (self.directory / file).with_suffix(".json").write_text(json.dumps(meta))
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
                self._candidates = self._load_candidates()
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
            text = _without_bos(text)
            matches = [c for c in self._candidates if text.startswith(_without_bos(c.prompt))]
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

    async def _restore(self, saved: _Saved, slot: int) -> bool:
        stats = KV_STATS.of(self.model)
        try:
            resp = await self._client.request(
                "POST",
                f"/slots/{slot}?action=restore",
                body=to_json({"filename": saved.file}),
                headers=_JSON,
                timeout_s=max(self.config.save_timeout_s, 5.0),
            )
        except TransportError as err:
            resp = None
            why = str(err)
        if resp is None or resp.status != 200:
            stats.failed += 1
            if resp is not None:
                why = f"HTTP {resp.status}: {resp.content[:200]!r}"
            log.warning("%s: restoring %s failed (%s): prefilling instead", self.model,
                        saved.file, why)  # fmt: skip
            return False
        answer = from_json(resp.content)
        stats.restored += 1
        stats.restored_bytes += int(answer.get("n_read") or 0)
        stats.last_restore_ms = float((answer.get("timings") or {}).get("restore_ms") or 0.0)
        self._touch(saved.file)
        log.info("%s: restored %s tokens into slot %d from %s", self.model,
                 answer.get("n_restored"), slot, saved.file)  # fmt: skip
        return True

    # ---- the directory --------------------------------------------------------------------------
    def _load_candidates(self) -> list[_Saved]:
        """This model's files for this key; files of the same model with another key are stale."""
        found: list[_Saved] = []
        stale_prefix = f"{_safe(self.model)}-"
        for meta_path in sorted(self.directory.glob(f"{stale_prefix}*.json")):
            data_path = meta_path.with_suffix(".bin")
            if not meta_path.name.startswith(self._prefix):
                if re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{16}", meta_path.stem[len(stale_prefix) :]):
                    _remove(meta_path, data_path)  # the model file or its options changed
                continue
            try:
                meta = json.loads(meta_path.read_text())
                size = data_path.stat().st_size
            except (OSError, ValueError):
                _remove(meta_path, data_path)
                continue
            found.append(_Saved(data_path.name, str(meta.get("prompt", "")), size))
        return [c for c in found if c.prompt]

    def _touch(self, file: str) -> None:
        with contextlib.suppress(OSError):
            (self.directory / file).touch()

    def enforce_budget(self) -> None:
        """Removes the least recently used files until the directory fits the budget."""
        enforce_budget(self.directory, self.config.budget_bytes)


def enforce_budget(directory: Path, budget_bytes: int) -> None:
    files = []
    for data in directory.glob("*.bin"):
        try:
            st = data.stat()
        except OSError:
            continue
        files.append((st.st_mtime, st.st_size, data))
    total = sum(size for _, size, _ in files)
    for _, size, data in sorted(files):  # oldest use first
        if total <= budget_bytes:
            break
        _remove(data.with_suffix(".json"), data)
        total -= size


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
