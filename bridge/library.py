"""The local models: GGUF files in the models dir, each known by an id (its path in the folder, no suffix).

Requests name models only by id; `resolve` turns an id into a file strictly inside the models dir, so a
request can never make the bridge open a path of its choosing.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import NotFound, UnsafePath
from .formats import QUANT_RE, SPLIT_RE

GGUF_SUFFIX = ".gguf"
# Split models (`-00001-of-00003`, formats.SPLIT_RE): the first shard stands for the set, later shards are
# not listed.
# Files still being written: the download manager's partial files and its hard-link step, and the usual
# names other downloaders use. They are never models, and their growth is no change to the models list.
PARTIAL_SUFFIXES = (".incomplete", ".link", ".part", ".partial", ".tmp", ".crdownload", ".aria2")
# Vision projectors (llama.cpp's --mmproj files) are not models of their own: they are listed apart
# (`projectors`) and paired with the model beside them (bridge.companions.pairing).
_PROJECTOR = re.compile(r"mmproj", re.IGNORECASE)


@dataclass
class LocalModel:
    id: str
    path: Path
    size_bytes: int


def model_id(path: Path, root: Path) -> str:
    return _unsplit(path.relative_to(root).as_posix())[: -len(GGUF_SUFFIX)]


def _unsplit(name: str) -> str:
    """A split model's file name (or path) without its shard part: `x-00001-of-00003.gguf` -> `x.gguf`."""
    return SPLIT_RE.sub("", name)


def scan(root: Path) -> list[LocalModel]:
    """Every GGUF model under `root` (sub-folders included), sorted by id."""
    models = []
    for path in _gguf_files(root):
        shard = SPLIT_RE.search(path.name)
        if (shard and shard["no"] != "00001") or is_projector(path):
            continue
        with contextlib.suppress(OSError):  # gone since the folder was read
            models.append(LocalModel(model_id(path, root), path, _set_size(path, shard is not None)))
    return sorted(models, key=lambda m: m.id)


def is_projector(path: Path | str) -> bool:
    """A vision projector by its name, as every uploader names them (`mmproj-*.gguf`, `*-mmproj-f16.gguf`)."""
    return bool(_PROJECTOR.search(Path(path).name))


def projectors(root: Path) -> list[LocalModel]:
    """The vision projectors under `root`, with ids like models' ids."""
    found = []
    for path in _gguf_files(root):
        if is_projector(path):
            with contextlib.suppress(OSError):
                found.append(LocalModel(model_id(path, root), path, path.stat().st_size))
    return sorted(found, key=lambda m: m.id)


def _gguf_files(root: Path) -> list[Path]:
    """The .gguf files under `root`. os.walk passes over a folder removed while it walks (a user deleting
    a model, a download moving into place), where Path.rglob raises."""
    found = []
    for folder, _dirs, files in os.walk(root):
        found += [Path(folder) / name for name in files if name.endswith(GGUF_SUFFIX)]
    return sorted(p for p in found if p.is_file())


def _set_size(path: Path, sharded: bool) -> int:
    if not sharded:
        return path.stat().st_size
    prefix = _unsplit(path.name)[: -len(GGUF_SUFFIX)]
    return sum(p.stat().st_size for p in path.parent.glob(f"{prefix}-*-of-*{GGUF_SUFFIX}"))


def check_id(model: str) -> str:
    """Reject ids that could leave the models dir: absolute paths, `..`, backslashes, NUL bytes."""
    if not model or "\\" in model or "\x00" in model or ":" in model:
        raise UnsafePath(
            f"model id {model!r} is not valid: use an id from GET /bridge/v1/models", model=model
        )
    parts = PurePosixPath(model).parts
    if model.startswith("/") or any(part in ("..", ".") for part in parts):
        raise UnsafePath(
            f"model id {model!r} is not valid: ids are names inside the models folder, not paths", model=model
        )
    return model


def resolve(root: Path, model: str) -> LocalModel:
    """The model with this id (with or without the .gguf suffix) in `root`."""
    check_id(model)
    wanted = model[: -len(GGUF_SUFFIX)] if model.endswith(GGUF_SUFFIX) else model
    for found in scan(root):
        if found.id == wanted:
            return found
    raise NotFound(f"no model {model!r} in {root}; GET /bridge/v1/models lists the models there", model=model)


def is_partial(path: str | Path) -> bool:
    """A file still being downloaded or copied into place (see PARTIAL_SUFFIXES)."""
    return Path(path).name.lower().endswith(PARTIAL_SUFFIXES)


def quant_of(path: Path) -> str | None:
    """The quant a file's name gives (`Q4_K_M`), upper-case, or None."""
    match = QUANT_RE.search(path.name)
    return match.group(0).upper() if match else None


def name_stem(path: Path) -> str:
    """A file's name without its shard part, suffix and quant: siblings of one model share it
    (`tiny-llama-Q4_K_M.gguf` and `tiny-llama-Q8_0.gguf` both give `tiny-llama`)."""
    name = _unsplit(path.name)
    stem = name[: -len(GGUF_SUFFIX)] if name.endswith(GGUF_SUFFIX) else Path(name).stem
    return QUANT_RE.sub("", stem).strip("-_. ").lower()


def siblings(path: Path) -> dict[str, Path]:
    """The other quants of the model in `path`, in the same folder: {quant: file} (this one included)."""
    stem = name_stem(path)
    found: dict[str, Path] = {}
    for model in scan(path.parent):
        if model.path.parent != path.parent or name_stem(model.path) != stem:
            continue
        quant = quant_of(model.path)
        if quant is not None:
            found.setdefault(quant, model.path)
    return found
