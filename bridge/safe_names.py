"""Whether a name from outside (a Hugging Face file path) is a plain file name on every platform.

Windows' rules are the strictest, and a name that breaks them is not merely invalid there: `b:c.gguf`
joined under `D:\\models` is the drive-relative path `b:c.gguf`, outside the models folder; `C:x.gguf`
lands in the current folder of drive C:; `x.gguf:s` writes an NTFS alternate data stream. So every
part of a path the bridge builds from a Hub listing is held to these rules on every platform (which also
keeps a models folder copyable between machines).

Rules from Microsoft's "Naming Files, Paths, and Namespaces": none of `<>:"/\\|?*` or characters 0-31,
no trailing dot or space, and not a device name (CON, PRN, AUX, NUL, COM0-9, LPT0-9, also with a
suffix: `con.gguf` is the console).
"""

from __future__ import annotations

import re

MAX_PART = 255  # NTFS, ext4 and APFS all stop a single name at 255
_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_DEVICE = re.compile(r"(CON|PRN|AUX|NUL|CONIN\$|CONOUT\$|(COM|LPT)[0-9¹²³])(\..*)?", re.IGNORECASE)


def name_problem(part: str) -> str | None:
    """Why `part` is not a safe file or folder name, or None when it is."""
    if part in ("", ".", ".."):
        return "is empty or a relative step"
    if match := _FORBIDDEN.search(part):
        return f"holds {match.group(0)!r}, which Windows does not allow in a name"
    if part[-1] in ". ":
        return "ends with a dot or a space, which Windows drops"
    if _DEVICE.fullmatch(part.rstrip(" .")):
        return "is a Windows device name"
    if len(part) > MAX_PART:
        return f"is longer than {MAX_PART} characters"
    return None
