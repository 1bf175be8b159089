"""The kernel's page cache as Ollama gets it for free: an LRU of model files within a host budget.

llama.cpp reads (maps) the model file at every load, so Linux keeps recently loaded files in RAM
and a reload of one of them reads at memory speed. This is the honest baseline's host tier: files
enter when a load touches them, the least recently touched leave first, and a file larger than
what is left of the budget is cached in part (the kernel works in pages, not files). The cost of
a load is then ``cached ÷ host bandwidth + uncached ÷ disk bandwidth + engine start``.
"""

from __future__ import annotations

from collections import OrderedDict

from residency.errors import ConfigError


class LruPageCache:
    """Bytes of each file in RAM under an LRU of ``budget`` bytes. Deterministic."""

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ConfigError("page cache: the budget must be ≥ 0")
        self.budget = budget
        self._cached: OrderedDict[str, int] = OrderedDict()  # key → bytes in RAM, LRU first
        self.used = 0

    def cached(self, key: str) -> int:
        return self._cached.get(key, 0)

    def touch(self, key: str, nbytes: int) -> int:
        """A load reads all of ``key`` (``nbytes``): returns how many bytes came from RAM, and
        leaves the file most recently used, as much of it cached as the budget allows."""
        was = self._cached.pop(key, 0)
        self.used -= was
        hit = min(was, nbytes)  # a file rewritten smaller keeps none of its old tail
        keep = min(nbytes, self.budget)
        # Make room from the least recently used end; the last victim may stay in part.
        while self.used + keep > self.budget:
            victim, vbytes = next(iter(self._cached.items()))
            take = min(vbytes, self.used + keep - self.budget)
            if take == vbytes:
                del self._cached[victim]
            else:
                self._cached[victim] = vbytes - take
            self.used -= take
        if keep:
            self._cached[key] = keep
            self.used += keep
        return hit
