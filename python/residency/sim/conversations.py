"""What a conversation's earlier turns cost a runner that does not hold them, in the simulator.

A turn of a conversation (``Trace.context`` tokens carried from earlier turns) costs nothing extra
on a runner that served the conversation before and still holds it in one of its ``parallel``
slots (llama-server reuses the cached prefix; the slots are LRU, as llama-server picks the slot
with the longest common prefix and otherwise the least recently used one). Otherwise — the
runner is new since that turn (an eviction, an expiry) or the slot went to other conversations —
its first token waits for the context:

- **prefill** (KV persistence off, or nothing saved): ``context ÷ prefill tokens/s``;
- **restore** (KV persistence on and the conversation was in a slot of a runner that stopped):
  ``context × KV bytes per token ÷ restore bandwidth`` (runners.kvcache restores the saved slot),
  the bandwidth being the lower of llama-server's measured restore speed and the trace's disk
  bandwidth (a file saved long ago is read from disk, not the page cache).

With KV persistence a stop first saves every slot it holds: ``bytes ÷ save bandwidth``, at most
``kv_save_timeout_s`` (what is not saved by then is lost), before the runner's memory is freed.

Calibration (``SimConfig`` defaults) comes from ``benchmarks/bench_kv_restore.py`` on the 2-core
dev machine: Gemma 3 270M (a 0.253 GB file) on llama-server, CPU. Other model sizes scale
linearly from it — prefill time per token and KV bytes per token both grow with the model
(compute ∝ parameters; KV width ∝ layers × heads): a crude rule, stated rather than hidden.
Saved files are assumed to fit the disk budget.
"""

from __future__ import annotations

from collections import OrderedDict

from residency.sim.trace import GB

__all__ = ["ConversationCosts"]

#: The calibration model's file size (Gemma 3 270M Q4_K_M), decimal GB.
REFERENCE_GB = 0.253


class ConversationCosts:
    """Which conversations each simulated runner holds, which were saved, and what a turn costs."""

    def __init__(
        self,
        model_bytes: list[int],
        *,
        parallel: int,
        kv_persist: bool,
        prefill_tokens_per_s: float,
        kv_bytes_per_token: float,
        restore_gb_per_s: float,
        save_gb_per_s: float,
        save_timeout_s: float,
    ) -> None:
        scale = [b / GB / REFERENCE_GB for b in model_bytes]
        self._prefill_s_per_token = [x / prefill_tokens_per_s for x in scale]
        self._kv_bytes_per_token = [x * kv_bytes_per_token for x in scale]
        self._restore_bps = restore_gb_per_s * GB
        self._save_bps = save_gb_per_s * GB
        self._save_timeout_s = save_timeout_s
        self._parallel = parallel
        self.kv_persist = kv_persist
        #: Per model: the conversations its runner's slots hold (LRU first) → their context.
        self._slots: list[OrderedDict[int, int]] = [OrderedDict() for _ in model_bytes]
        #: Conversations saved by a stopping runner (KV persistence), with their model.
        self._saved: dict[int, int] = {}
        self.seconds = 0.0
        self.prefills = self.restores = 0

    def turn(self, mi: int, conversation: int, context: int) -> float:
        """A turn begins on model `mi`'s runner: seconds before its first token (beyond the turn's
        own prefill, part of its service time)."""
        slots = self._slots[mi]
        held = conversation in slots
        slots[conversation] = context
        slots.move_to_end(conversation)
        while len(slots) > self._parallel:
            slots.popitem(last=False)
        if held or context == 0:
            return 0.0
        if self.kv_persist and self._saved.get(conversation) == mi:
            cost = context * self._kv_bytes_per_token[mi] / self._restore_bps
            self.restores += 1
        else:
            cost = context * self._prefill_s_per_token[mi]
            self.prefills += 1
        self.seconds += cost
        return cost

    def stopped(self, mi: int) -> float:
        """Model `mi`'s runner stops: seconds it spends saving its slots first."""
        slots = self._slots[mi]
        if not self.kv_persist:
            slots.clear()
            return 0.0
        spent = 0.0
        for conversation, context in slots.items():
            took = context * self._kv_bytes_per_token[mi] / self._save_bps
            if spent + took > self._save_timeout_s:
                spent = self._save_timeout_s  # the rest is skipped, as runners.kvcache does
                break
            spent += took
            self._saved[conversation] = mi
        slots.clear()
        return spent
