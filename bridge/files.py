"""Replacing and deleting files that another program may hold open (Windows).

POSIX lets a file be unlinked or renamed over while it is open. Windows does not: a file opened without
FILE_SHARE_DELETE, as llama.cpp's memory map of the model it serves is, cannot be deleted or replaced
until it is closed, and the call raises PermissionError (WinError 32 or 5). Virus scanners and the search
indexer also open a freshly written file for a moment. So a move or a delete is retried briefly, which
outlasts a scanner, and then reported as a file in use, with what to do, instead of a traceback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from .errors import Conflict

# About 2 s in all: longer than a scanner holds a new file, short enough for someone waiting.
RETRY_DELAYS_S = (0.05, 0.1, 0.25, 0.5, 1.0)
# Windows errors for a file held open: ERROR_ACCESS_DENIED, ERROR_SHARING_VIOLATION, ERROR_LOCK_VIOLATION,
# ERROR_USER_MAPPED_FILE. On POSIX a PermissionError is a real lack of permission: no retry.
IN_USE_ERRORS = {5, 32, 33, 1224}


class FileInUse(Conflict):
    code = "file_in_use"


def replace(source: Path | str, target: Path | str) -> None:
    """`os.replace`, retried while another program holds `target` (or `source`) open."""
    _retrying(lambda: os.replace(source, target), Path(target))


def unlink(path: Path | str) -> None:
    """Delete `path` (gone already is fine), retried while another program holds it open."""
    _retrying(lambda: Path(path).unlink(missing_ok=True), Path(path))


def _retrying(action: Callable[[], None], path: Path) -> None:
    for delay in (*RETRY_DELAYS_S, None):
        try:
            action()
            return
        except PermissionError as exc:
            if getattr(exc, "winerror", None) not in IN_USE_ERRORS:
                raise Conflict(f"{path} cannot be changed: {exc.strerror}", path=str(path)) from exc
            if delay is None:
                raise FileInUse(
                    f"{path} is open in another program (a bridge serving this model, or a virus scanner), "
                    "so it cannot be changed; unload the model or close that program and try again",
                    path=str(path),
                ) from exc
            time.sleep(delay)
