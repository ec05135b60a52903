"""Command-line output that survives any console code page.

Python on Windows (outside UTF-8 mode) writes a redirected or piped stdout in the ANSI code page, cp1252
in the West and cp932 in Japan, and raises UnicodeEncodeError on a character the code page lacks:
`st-bridge hardware | more` would crash on the "·" of the summary under cp932. So readable output keeps
the console's encoding and swaps what it cannot encode for an ASCII look-alike, while JSON is always
written as UTF-8 bytes: a program reading `st-bridge hardware --json > hw.json` gets valid UTF-8 whatever
the code page, and a Windows console (which takes UTF-8 bytes on its binary layer) still shows it right.
"""

from __future__ import annotations

import codecs
import json
import sys
from typing import Any

ERRORS = "st_bridge_ascii"
# The non-ASCII characters the bridge prints, and what stands in for them where the console lacks them.
_LOOK_ALIKES = {"·": "|", "—": "-", "–": "-", "→": "->", "…": "...", "±": "+/-", "×": "x", "≥": ">=",
                "≤": "<="}


def _look_alike(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start:error.end]
    return "".join(_LOOK_ALIKES.get(char, "?") for char in text), error.end


codecs.register_error(ERRORS, _look_alike)


def prepare_streams() -> None:
    """Make stdout and stderr replace what their encoding cannot hold instead of raising."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        encoding = codecs.lookup(getattr(stream, "encoding", None) or "utf-8").name
        if reconfigure is not None and encoding != "utf-8":
            reconfigure(errors=ERRORS)


def write_json(data: Any) -> None:
    """`data` as indented JSON on stdout, in UTF-8 whatever the console's code page."""
    text = json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n"
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a stream without a byte layer (a test's StringIO): it takes text as it is
        sys.stdout.write(text)
        return
    sys.stdout.flush()  # whatever was printed before comes first
    buffer.write(text.encode("utf-8"))
    buffer.flush()
