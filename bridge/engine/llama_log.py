"""llama.cpp's log, kept off the hot path.

llama.cpp logs through one process-wide callback. Ours drops debug and info lines at once (they are
formatted in C and would otherwise cost a Python call per line on stderr) and keeps the last warnings and
errors, so a failed load can say *why* ("tensor data is not within the file bounds", ...).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections import deque
from collections.abc import Iterator

import llama_cpp

# ggml.h: enum ggml_log_level
_LEVEL_WARN = 3
_LEVEL_ERROR = 4
_LEVEL_CONT = 5

_recent: deque[str] = deque(maxlen=40)
_lock = threading.Lock()
_state = {"last_kept": False}
_captured: list[str] | None = None  # every line, debug included, while a load is being recorded


def _on_log(level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
    if _captured is not None and text:
        _captured.append(text.decode("utf-8", errors="replace"))
    if level == _LEVEL_CONT:
        keep = _state["last_kept"]
    else:
        keep = level in (_LEVEL_WARN, _LEVEL_ERROR)
        _state["last_kept"] = keep
    if not keep or not text:
        return
    line = text.decode("utf-8", errors="replace").strip()
    if line:
        with _lock:
            _recent.append(line)


# The ctypes function object must outlive every call llama.cpp makes to it: keep it at module level.
_callback = llama_cpp.llama_log_callback(_on_log)


def callback() -> object:
    """The filter itself, for libraries that log apart from llama.cpp (mtmd has its own setter)."""
    return _callback


def install() -> None:
    """Route llama.cpp's log through the filter above (idempotent)."""
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def clear() -> None:
    with _lock:
        _recent.clear()


def recent(limit: int = 5) -> list[str]:
    """The last warnings and errors llama.cpp logged, oldest first."""
    with _lock:
        return list(_recent)[-limit:]


@contextlib.contextmanager
def capture() -> Iterator[list[str]]:
    """Record every line llama.cpp logs meanwhile (a load: its buffers per device are logged at info and
    debug level, which are otherwise dropped). The list fills as lines arrive."""
    global _captured
    lines: list[str] = []
    _captured = lines
    try:
        yield lines
    finally:
        _captured = None
