"""Per-chat memory: KV states of the conversations the cache held before, kept to be restored later.

The KV cache holds one conversation. When a prompt from another chat arrives (ST switches chats, or two
browser tabs take turns), the cache would be thrown away and the old chat reprocessed from scratch when
it comes back. Instead the worker saves the cache's state (llama.cpp's per-sequence state, with the
tokens it holds) here before it leaves a conversation, and restores the saved state that serves a new
prompt best before the usual prefix/shift reuse (`reuse.py`) runs on it.

When a prompt belongs to another chat (`leaves`): it throws away the end of the cached conversation (at
least `MIN_WORTH` tokens after all that the prefix/shift plan keeps) and goes on with its own (at least
`MIN_WORTH` new tokens). Two chats with the same character card share the card but not their ends, so
they count as different chats. A next turn continues the cached end; a trimmed chat drops old messages
but keeps the end (shifted); a regenerated reply throws the old reply away but adds nothing: none of
them saves anything. A saved state is restored when it serves more than `MIN_WORTH` prompt tokens
beyond what the cache serves; the cache is then always leaving, so it is saved first.

States live in RAM up to a budget; the least recently used spill to disk (when a disk budget is given)
and beyond that are dropped. A restored state leaves the store: it is live in the cache again and is
saved anew when the cache leaves it. Each worker process has its own store (a new model is a new
process), so a state is never restored into a model other than the one that made it; the disk files of
a process live in a folder of their own, removed when it closes and, after a crash, by the next one.

Nothing here imports llama.cpp: the worker copies the bytes in and out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import psutil

from bridge.engine.reuse import ReusePlan, plan_reuse

MIB = 1024 * 1024
# Fewer tokens than this are evaluated again faster than a state is copied, and are not worth a slot.
MIN_WORTH = 32


def thrown_tail(plan: ReusePlan, cached: int) -> int:
    """The cached tokens after all that `plan` keeps (or drops to shift the rest): the end of the cached
    conversation that the prompt does not continue."""
    return cached - (plan.prefix + plan.dropped + plan.shifted)


def leaves(plan: ReusePlan, cached: int, prompt: int) -> bool:
    """A `prompt`-token prompt, served from `cached` tokens by `plan`, belongs to another chat."""
    return thrown_tail(plan, cached) >= MIN_WORTH and prompt - plan.reused >= MIN_WORTH


@dataclass
class Saved:
    """One saved conversation: its tokens and its state, in RAM (`data`) or in a file (`path`)."""

    tokens: list[int]
    size: int
    data: bytearray | None = None
    path: Path | None = None


@dataclass(frozen=True)
class Match:
    """The saved state that serves a prompt best, and how many prompt tokens it would serve."""

    key: int
    reused: int


class ChatMemory:
    """Saved conversations, least recently used first, bounded by a RAM and a disk budget (bytes)."""

    def __init__(self, ram_bytes: int, disk_bytes: int = 0, disk_dir: str | Path | None = None) -> None:
        self.ram_bytes = max(ram_bytes, 0)
        self.disk_bytes = max(disk_bytes, 0) if disk_dir else 0
        self.entries: OrderedDict[int, Saved] = OrderedDict()
        self._next = 0
        self.folder: Path | None = None
        if self.enabled and self.disk_bytes:
            try:
                self.folder = _own_folder(Path(disk_dir))  # type: ignore[arg-type]
            except OSError:  # an unwritable folder costs the disk tier, never the model load
                self.disk_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.ram_bytes > 0

    @property
    def ram_used(self) -> int:
        return sum(e.size for e in self.entries.values() if e.data is not None)

    @property
    def disk_used(self) -> int:
        return sum(e.size for e in self.entries.values() if e.path is not None)

    def fits(self, size: int) -> bool:
        """A state of `size` bytes can be kept somewhere (checked before copying it out)."""
        return self.enabled and (size <= self.ram_bytes or size <= self.disk_bytes)

    def best(self, prompt: list[int], *, can_shift: bool, better_than: int) -> Match | None:
        """The saved state that would serve more than `better_than` tokens of `prompt`, the most of all."""
        found: Match | None = None
        for key, entry in self.entries.items():
            reused = plan_reuse(entry.tokens, prompt, can_shift=can_shift).reused
            if reused > better_than and (found is None or reused > found.reused):
                found = Match(key, reused)
        return found

    def put(self, tokens: list[int], data: bytearray) -> None:
        """Keep a conversation as the most recently used, evicting the least recently used to fit."""
        if not self.fits(len(data)):
            return
        self._next += 1
        self.entries[self._next] = Saved(tokens=list(tokens), size=len(data), data=data)
        self._fit_ram()

    def take(self, key: int) -> tuple[list[int], bytearray] | None:
        """Remove a saved conversation from the store and return its tokens and state (None: its file
        could not be read back)."""
        entry = self.entries.pop(key)
        if entry.data is not None:
            return entry.tokens, entry.data
        assert entry.path is not None
        data = bytearray(entry.size)
        try:
            with entry.path.open("rb") as f:
                complete = f.readinto(data) == entry.size
        except OSError:
            complete = False
        entry.path.unlink(missing_ok=True)
        return (entry.tokens, data) if complete else None

    def clear(self) -> None:
        for entry in self.entries.values():
            if entry.path is not None:
                entry.path.unlink(missing_ok=True)
        self.entries.clear()

    def close(self) -> None:
        self.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    # ---- eviction ----------------------------------------------------------------------------------

    def _fit_ram(self) -> None:
        for key, entry in list(self.entries.items()):  # oldest first
            if self.ram_used <= self.ram_bytes:
                return
            if entry.data is not None:
                self._spill(key, entry)

    def _spill(self, key: int, entry: Saved) -> None:
        """Move a state out of RAM: to disk when the disk budget can take it, else drop it."""
        assert entry.data is not None
        if self.folder is None or entry.size > self.disk_bytes:
            del self.entries[key]
            return
        self._fit_disk(self.disk_bytes - entry.size)
        path = self.folder / f"{key}.state"
        try:
            _write_atomically(path, entry.data)
        except OSError:  # a full disk: the chat is forgotten, the request goes on
            del self.entries[key]
            return
        entry.path, entry.data = path, None

    def _fit_disk(self, limit: int) -> None:
        for key, entry in list(self.entries.items()):
            if self.disk_used <= limit:
                return
            if entry.path is not None:
                entry.path.unlink(missing_ok=True)
                del self.entries[key]


def _write_atomically(path: Path, data: bytearray) -> None:
    """A reader never sees half a file: write beside it, then rename over."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _own_folder(root: Path) -> Path:
    """This process's folder under `root`; folders of processes that are gone (crashed) are removed."""
    root.mkdir(parents=True, exist_ok=True)
    for child in root.iterdir():
        if child.is_dir() and child.name.isdigit() and not _alive(int(child.name)):
            shutil.rmtree(child, ignore_errors=True)
    folder = root / str(os.getpid())
    shutil.rmtree(folder, ignore_errors=True)  # a reused pid: whatever is there is not ours
    folder.mkdir()
    return folder


def _alive(pid: int) -> bool:
    # Not os.kill(pid, 0): on Windows signal 0 is CTRL_C_EVENT, a Ctrl+C to every process on the console.
    return psutil.pid_exists(pid)
