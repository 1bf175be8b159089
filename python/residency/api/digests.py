"""Model files' SHA-256, as Ollama shows a model's digest: hashed once per file version (path,
size, mtime) on a background thread, never on a request's path.

A file in Ollama's blob store is named by its SHA-256 already (``sha256-<hex>``); only other files
are read. Until a file's hash is ready its digest is shown as an empty string.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import deque
from pathlib import Path

__all__ = ["DIGESTS", "BlobDigests"]

log = logging.getLogger("residency.api")

_BLOB_NAME = re.compile(r"sha256[-:]([0-9a-f]{64})")
_CHUNK = 1 << 20
Key = tuple[str, int, int]


class BlobDigests:
    """Hashes files in the background; :meth:`digest` answers from what is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[Key, str] = {}
        self._queue: deque[Key] = deque()
        self._queued: set[Key] = set()
        self._worker: threading.Thread | None = None

    def digest(self, path: Path) -> str:
        """The file's SHA-256 (hex) if known; else "" and the file is queued for hashing."""
        named = _BLOB_NAME.fullmatch(path.name)
        if named:
            return named.group(1)
        try:
            st = path.stat()
        except OSError:
            return ""
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            done = self._done.get(key)
            if done is not None:
                return done
            if key not in self._queued:
                self._queued.add(key)
                self._queue.append(key)
                if self._worker is None:
                    # Daemon: an interrupted hash is only lost work, never a wrong answer.
                    self._worker = threading.Thread(
                        target=self._drain, name="residency-digests", daemon=True
                    )
                    self._worker.start()
        return ""

    def wait_idle(self, timeout_s: float) -> bool:
        """Waits until every queued file is hashed (for tests and start-up); True if it is."""
        with self._lock:
            worker = self._worker
        if worker is not None:
            worker.join(timeout_s)
            return not worker.is_alive()
        return True

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                key = self._queue.popleft()
            value = _sha256(Path(key[0]))
            with self._lock:
                self._queued.discard(key)
                if value:
                    self._done[key] = value


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as err:
        log.warning("cannot hash %s: %s", path, err)
        return ""
    return h.hexdigest()


#: The one per process: a file's hash is shared by every app and request.
DIGESTS = BlobDigests()
