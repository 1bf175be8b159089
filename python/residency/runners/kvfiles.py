"""The directory of saved llama-server slots: names, sidecars with checksums, the disk budget.

- **Names**: ``<model>-<key>-<prefix>.bin``: the model's name, a hash of what makes a cache
  reusable (the model file's path, size and mtime; the llama-server binary's; the slot's context,
  KV type and extra args), and a hash of the cached prompt.
- **Sidecar** ``.json``: the prompt text, the token count, and the data file's size and CRC-32,
  written only once llama-server answered the save — a file without a sidecar, or whose bytes no
  longer match it, is never handed to llama-server: a truncated slot file (a save cut short by a
  stop, a full disk) makes the vendored llama-server abort on restore.
- **Budget**: beyond ``budget_bytes`` the least recently used files go; files of the same model
  with another key (a changed file, binary or options) go when a runner for the model starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KvPersistence",
    "SavedSlot",
    "SlotFiles",
    "cache_key",
    "enforce_budget",
    "without_bos",
]

#: Sidecars of this format carry the checksum; older ones are removed, never trusted.
_FORMAT = 2
_CHUNK = 8 << 20


@dataclass(frozen=True)
class KvPersistence:
    """One llama-server runner's KV persistence (its LaunchSpec's ``kv``; runners.choice makes
    it from the settings): where slots are saved, how many bytes may stay, how long a stop waits."""

    directory: Path
    #: Files beyond this many bytes are removed, least recently used first.
    budget_bytes: int = 4 << 30
    #: The longest a stop waits for saves; what is unsaved by then is skipped (see README).
    save_timeout_s: float = 5.0


@dataclass(frozen=True)
class SavedSlot:
    file: str
    prompt: str
    size: int
    crc32: int


def _file_id(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        st = path.stat()
    except OSError:
        return str(path)
    return f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"


def cache_key(
    model_path: Path, *, ctx: int, kv_type: str, args: tuple[str, ...], binary: Path | None = None
) -> str:
    """What makes a saved slot reusable: the same model file, the same llama-server build (its
    file format may change), the same cache layout."""
    text = f"{_file_id(model_path)}\0{_file_id(binary)}\0{ctx}\0{kv_type.lower()}\0{' '.join(args)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def safe_name(name: str) -> str:
    """A model name as llama-server accepts in a file name (letters, digits, . _ -)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "model"


def without_bos(text: str) -> str:
    # A slot's prompt is detokenized with its BOS; a rendered template may or may not carry one.
    return text.removeprefix("<bos>").removeprefix("<s>")


def crc32_of(path: Path) -> tuple[int, int]:
    """(size, CRC-32) of a file, read in chunks (zlib's CRC runs at GB/s: ~20 ms for 80 MiB)."""
    crc = size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


class SlotFiles:
    """One model's (and key's) files in the directory every runner shares."""

    def __init__(self, directory: Path, model: str, key: str) -> None:
        self.directory = directory
        self.model = model
        self.key = key
        self.prefix = f"{safe_name(model)}-{key}-"

    def name_for(self, prompt: str) -> str:
        return f"{self.prefix}{hashlib.sha256(without_bos(prompt).encode()).hexdigest()[:16]}.bin"

    def record(self, file: str, prompt: str, tokens: object) -> int:
        """Writes the sidecar of a file llama-server just saved; returns its size. Run in a
        thread: it reads the whole file for its checksum."""
        data = self.directory / file
        size, crc = crc32_of(data)
        meta = {"format": _FORMAT, "model": self.model, "key": self.key, "prompt": prompt,
                "tokens": tokens, "bytes": size, "crc32": crc}  # fmt: skip
        sidecar = data.with_suffix(".json")
        tmp = sidecar.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(sidecar)  # a sidecar is whole or absent
        return size

    def intact(self, saved: SavedSlot) -> bool:
        """Whether the data file still holds exactly what was saved. Run in a thread."""
        try:
            return crc32_of(self.directory / saved.file) == (saved.size, saved.crc32)
        except OSError:
            return False

    def candidates(self) -> list[SavedSlot]:
        """This model's files for this key; files of the same model with another key are stale,
        and so are files without a readable, current sidecar."""
        found: list[SavedSlot] = []
        stale_prefix = f"{safe_name(self.model)}-"
        for meta_path in sorted(self.directory.glob(f"{stale_prefix}*.json")):
            data_path = meta_path.with_suffix(".bin")
            if not meta_path.name.startswith(self.prefix):
                if re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{16}", meta_path.stem[len(stale_prefix) :]):
                    remove(meta_path, data_path)  # the model file or its options changed
                continue
            try:
                meta = json.loads(meta_path.read_text())
                saved = SavedSlot(
                    data_path.name, str(meta["prompt"]), int(meta["bytes"]), int(meta["crc32"])
                )
                if meta.get("format") != _FORMAT or not saved.prompt:
                    raise ValueError("an old or empty sidecar")
            except (OSError, ValueError, KeyError, TypeError):
                remove(meta_path, data_path)
                continue
            found.append(saved)
        return found

    def drop(self, saved: SavedSlot) -> None:
        data = self.directory / saved.file
        remove(data.with_suffix(".json"), data)

    def touch(self, saved: SavedSlot) -> None:
        with contextlib.suppress(OSError):
            (self.directory / saved.file).touch()


def enforce_budget(directory: Path, budget_bytes: int) -> None:
    """Removes the least recently used files until the directory fits the budget."""
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
        remove(data.with_suffix(".json"), data)
        total -= size


def remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
