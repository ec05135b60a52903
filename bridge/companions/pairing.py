"""Which vision projector (mmproj) belongs to which model: in the models folder, on the Hub, in the catalog.

Vision models come as language weights plus a projector in the same repository (ggml-org, lmstudio-
community, bartowski name it `mmproj-*.gguf`), and downloads keep a repository's files in one folder
(`<models>/<owner>/<repo>/`). So a model's projector is a projector in its own folder: the only one, or,
where a folder holds several (koboldcpp/mmproj), the one whose name shares the most words with the
model's. Where both headers tell their widths, the projector's output must be the model's n_embd (what
mtmd checks when it loads): a projector for another model is never paired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import library
from ..errors import BridgeError, NotFound
from ..formats import QUANT_RE
from ..gguf import GGUFHeader, model_info, read_file

# Words of a file name that say nothing about which model it is.
NOISE = {"mmproj", "model", "gguf", "f16", "f32", "bf16", "q8", "q4", "q5", "q6", "0", "k", "m", "s", "it",
         "instruct", "chat", "vision", "hf"}
# Tensors whose rows are the projector's output (the text model's width), by projector type.
OUTPUT_TENSORS = ("mm.2.weight", "mm.input_projection.weight", "mm.model.fc.weight", "mm.fc.weight",
                  "mm.1.weight", "mm.model.mlp.3.weight")


@dataclass
class Projector:
    path: Path
    model_id: str  # its id in the models folder


def words(name: str) -> set[str]:
    stem = name.lower().removesuffix(".gguf")
    stem = QUANT_RE.sub(" ", stem)
    return {w for w in re.split(r"[-_.\s]+", stem) if w and w not in NOISE}


def output_width(header: GGUFHeader) -> int | None:
    """The width a projector writes into the text model (ggml's rows of its last matrix), when known."""
    tensors = {t.name: t for t in header.tensors}
    for name in OUTPUT_TENSORS:
        if name in tensors and len(tensors[name].shape) >= 2:
            return int(tensors[name].shape[1])
    return None


def local_projector(model_path: Path, models_dir: Path) -> Projector | None:
    """The projector paired with the model at `model_path`, from the projectors in its folder."""
    root = models_dir.resolve()
    folder = model_path.resolve().parent
    candidates = [p for p in library.projectors(root) if p.path.resolve().parent == folder]
    width = _model_width(model_path)
    fitting = [p for p in candidates if _fits(p.path, width)]
    if not fitting:
        return None
    if len(fitting) > 1:
        wanted = words(model_path.name)
        ranked = sorted(fitting, key=lambda p: (-len(words(p.path.name) & wanted), p.path.name))
        if not words(ranked[0].path.name) & wanted:
            return None  # several projectors and none names this model: no guess
        fitting = ranked
    return Projector(fitting[0].path, fitting[0].id)


def resolve(models_dir: Path, projector_id: str) -> Projector:
    """The projector with this id in the models folder (ids as GET /bridge/v1/companions lists them)."""
    library.check_id(projector_id)
    wanted = projector_id.removesuffix(library.GGUF_SUFFIX)
    for found in library.projectors(models_dir):
        if found.id == wanted:
            return Projector(found.path, found.id)
    raise NotFound(f"no projector {projector_id!r} in {models_dir}; GET /bridge/v1/companions lists them",
                   projector=projector_id)


def _model_width(path: Path) -> int | None:
    try:
        return model_info(read_file(path)).n_embd
    except (BridgeError, OSError):
        return None


def _fits(projector: Path, width: int | None) -> bool:
    try:
        header = read_file(projector)
    except (BridgeError, OSError):
        return False
    if header.get("general.architecture") not in (None, "clip"):
        return False
    out = output_width(header)
    return width is None or out is None or out == width


# --- the Hub and the catalog ---------------------------------------------------------------------------


def remote_projector(files: list[Any], weights_path: str) -> Any | None:
    """The projector file (a Hub listing entry with `.path` and `.size`) to fetch with `weights_path`:
    one in the same folder of the repository, F16 before F32 (as llama.cpp's docs use), else the smallest."""
    folder = weights_path.rpartition("/")[0]
    found = [f for f in files if library.is_projector(f.path) and f.path.rpartition("/")[0] == folder]
    if len(found) > 1:
        wanted = words(weights_path.rpartition("/")[2])
        named = [f for f in found if words(f.path.rpartition("/")[2]) & wanted]
        found = named or found
    if not found:
        return None
    return sorted(found, key=lambda f: ("f16" not in f.path.lower(), f.size))[0]


def catalog_projector(model: Any) -> dict[str, Any] | None:
    """The projector the catalog pairs with a vision model: one in its repository (F16 first), else its
    `projector_hint` (a projector kept in another repository, paired by model family)."""
    projectors = list(getattr(model, "projectors", []) or [])
    if projectors:
        best = sorted(projectors, key=lambda p: ("f16" not in p.path.lower(), p.size_bytes))[0]
        return {"repo": model.repo, "file": best.path, "size_bytes": best.size_bytes, "source": best.source,
                "source_url": best.source_url, "paired_by": "same repository"}
    hint = getattr(model, "projector_hint", None)
    if hint:
        return {**hint, "paired_by": "model family (a suggestion, not a tested pair)"}
    return None
