"""Say what a model file or folder is, whether st-bridge can run it, and why, in words a newcomer follows.

Covers what the SillyTavern guide's "how to identify the model type" lists: GGUF (single, split in parts,
multimodal projectors), older GGML files, safetensors (plain, sharded, and the GPU quant formats GPTQ, AWQ,
EXL2, bitsandbytes, FP8, compressed-tensors, told apart by `config.json` or the tensor names), PyTorch
pickles (`.bin`, `.pt`, `.pth`, `.ckpt`), ONNX, and anything else. File names are parsed for the quant
(`Q4_K_M`), parameter count (`8x7B`), context (`-16k`) and split part.

Pickles are identified by their first bytes only: they are never unpickled, because unpickling runs code.
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import gguf
from .errors import GGUFError, NotFound

WEIGHT_SUFFIXES = frozenset({".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".ggml"})
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt"})
MAX_JSON_BYTES = 8 << 20  # config.json and friends; real ones are a few KiB
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit
MAX_SCAN_DEPTH = 4
GET_GGUF = "st-bridge runs GGUF files — look for a -GGUF version of this model"

# Name patterns. Separators are - _ . or the ends of the name.
_EDGE_L, _EDGE_R = r"(?<![A-Za-z0-9])", r"(?![A-Za-z0-9])"
QUANT_RE = re.compile(
    _EDGE_L + r"(?P<ud>UD-)?(?P<q>IQ[1-4]_(?:XXS|XS|NL|S|M)|Q[1-8]_K(?:_(?:XL|S|M|L))?|Q[2-8]_[01](?:_\d_\d)?"
    r"|TQ[12]_0|MXFP4|BF16|F16|FP16|F32|FP32)" + _EDGE_R,
    re.IGNORECASE,
)
SIZE_RE = re.compile(
    _EDGE_L + r"(?P<experts>\d+x)?(?P<num>\d+(?:\.\d+)?)(?P<unit>[BM])" + _EDGE_R, re.IGNORECASE
)
CONTEXT_RE = re.compile(_EDGE_L + r"(?P<k>\d{1,4})k" + _EDGE_R, re.IGNORECASE)
SPLIT_RE = re.compile(r"-(?P<no>\d{5})-of-(?P<count>\d{5})(?=\.)")
BPW_RE = re.compile(_EDGE_L + r"(?P<bits>\d(?:\.\d+)?)bpw" + _EDGE_R, re.IGNORECASE)


@dataclass
class NameHints:
    """What a file name says about the model (uploaders' conventions, not guaranteed)."""

    quant: str | None = None  # Q4_K_M, IQ3_XS, UD-Q4_K_XL, BF16 ...
    size: str | None = None  # as written: 7B, 8x7B, 1.5B, 135M
    n_params: int | None = None  # total, from size (8x7B counts 56B: the name, not the file)
    context: int | None = None  # tokens, from -16k
    split_part: tuple[int, int] | None = None  # (part, of)


@dataclass
class Identified:
    """One model (a sharded set counts as one) or one file that is not a usable model."""

    path: str  # the file, or for a multi-file model its first part (or its folder)
    kind: str
    runnable: bool
    explanation: str  # one line for a newcomer
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0
    unsafe: bool = False  # a pickle: loading it could run code
    quant: str | None = None  # from the file itself when it says, else from the name
    bits: float | None = None  # for the GPU quant formats, when known
    name_hints: NameHints = field(default_factory=NameHints)
    info: gguf.ModelInfo | None = None  # GGUF models only

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["info"] = _info_summary(self.info) if self.info else None
        return out


def _info_summary(info: gguf.ModelInfo) -> dict[str, Any]:
    """The part of ModelInfo worth printing (not per-layer lists or the chat template)."""
    return {
        "architecture": info.architecture, "name": info.name, "n_params": info.n_params,
        "n_params_active": info.n_params_active, "n_layer": info.n_layer, "n_embd": info.n_embd,
        "n_ctx_train": info.n_ctx_train, "n_vocab": info.n_vocab, "n_expert": info.n_expert,
        "n_expert_used": info.n_expert_used, "sliding_window": info.sliding_window, "is_mla": info.is_mla,
        "is_recurrent": info.is_recurrent, "tied_output": info.tied_output, "file_type": info.file_type,
        "size_bytes": info.size_bytes, "shard_count": info.shard_count,
        "has_chat_template": info.chat_template is not None,
    }


# --- names ---------------------------------------------------------------------------------------------

def parse_name(name: str, folder: str = "") -> NameHints:
    """Quant, size, context and split part from a file name; what it lacks, from its folder's name
    (sharded safetensors are named model-00001-of-00003, the folder says "Mistral-7B-GPTQ")."""
    hints = _parse_one(name)
    if folder:
        extra = _parse_one(folder)
        hints.quant = hints.quant or extra.quant
        if hints.size is None:
            hints.size, hints.n_params = extra.size, extra.n_params
        hints.context = hints.context or extra.context
    return hints


def _parse_one(name: str) -> NameHints:
    hints = NameHints()
    if m := QUANT_RE.search(name):
        q = m["q"].upper().replace("FP16", "F16").replace("FP32", "F32")
        hints.quant = ("UD-" if m["ud"] else "") + q
    sizes = list(SIZE_RE.finditer(name))
    # Prefer billions: "-1M" after a "7B" is a context length, "135M" alone is a size.
    size = next((m for m in sizes if m["unit"].upper() == "B"), sizes[0] if sizes else None)
    if size:
        hints.size = size.group(0)[:-1] + size["unit"].upper()
        scale = 1e9 if size["unit"].upper() == "B" else 1e6
        experts = int(size["experts"][:-1]) if size["experts"] else 1
        hints.n_params = round(float(size["num"]) * scale * experts)
    if m := CONTEXT_RE.search(name):
        hints.context = int(m["k"]) * 1024
    if m := SPLIT_RE.search(name):
        hints.split_part = (int(m["no"]), int(m["count"]))
    return hints


# --- entry points ------------------------------------------------------------------------------------

def identify(path: str | Path) -> list[Identified]:
    """Every model in a file or folder. A missing path raises NotFound."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"no such file or folder: {p}")
    if p.is_dir():
        return identify_folder(p)
    return [identify_file(p)]


def identify_file(path: str | Path) -> Identified:
    """One file on its own (for a part of a split GGUF, the whole set it belongs to)."""
    p = Path(path)
    head = _head(p, 16)
    suffix = p.suffix.lower()
    if head[:4] == gguf.GGUF_MAGIC or suffix == ".gguf":
        return _identify_gguf(p)
    if head[:4] in gguf.LEGACY_MAGICS:
        return _legacy_ggml(p)
    if suffix == ".safetensors":
        return _identify_safetensors([p], config=_hf_config(p.parent))
    if suffix in PICKLE_SUFFIXES or _pickle_container(head):
        return _identify_pickle([p])
    if suffix == ".onnx":
        return _entry(p, "onnx", False, f"ONNX model: made for ONNX Runtime, not llama.cpp; {GET_GGUF}")
    return _entry(p, "unknown", False, "Not a model file st-bridge recognises (it runs .gguf files)")


def identify_folder(folder: str | Path, depth: int = 0) -> list[Identified]:
    """Each model in a folder and its subfolders; sharded sets and split GGUFs count once."""
    root = Path(folder)
    files = sorted(f for f in _list(root) if f.is_file() and f.suffix.lower() in WEIGHT_SUFFIXES)
    out = _gguf_entries([f for f in files if f.suffix.lower() == ".gguf"])
    out += _hf_entries(root, [f for f in files if f.suffix.lower() != ".gguf"])
    if depth < MAX_SCAN_DEPTH:
        for sub in sorted(d for d in _list(root) if d.is_dir() and not d.name.startswith(".")):
            out += identify_folder(sub, depth + 1)
    return out


def _list(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []  # unreadable folder: nothing to report from it


# --- GGUF --------------------------------------------------------------------------------------------

def _gguf_entries(files: list[Path]) -> list[Identified]:
    """Single GGUFs one by one, split sets once (through their first present part)."""
    out, seen_sets = [], set()
    for f in files:
        m = gguf.SHARD_RE.match(f.name)
        if m:
            key = (m["stem"].lower(), m["count"])
            if key in seen_sets:
                continue
            seen_sets.add(key)
        out.append(_identify_gguf(f))
    return out


def _identify_gguf(p: Path) -> Identified:
    hints = parse_name(p.name, p.parent.name)
    try:
        paths = gguf.shard_paths(p)
        header = gguf.read_file(p)
    except GGUFError as exc:
        return _entry(p, "gguf", False, f"Unusable GGUF: {exc.message}", hints=hints)
    files = [str(x) for x in paths]
    size = sum(_size(x) for x in paths)
    arch = header.get("general.architecture")
    if arch == "clip" or "mmproj" in p.name.lower():
        return Identified(
            path=str(paths[0]), kind="mmproj", runnable=False, files=files, size_bytes=size, name_hints=hints,
            quant=gguf.file_type_name(header.get("general.file_type")) or hints.quant,
            explanation="Multimodal projector (mmproj): lets a model of the same family see images; "
            "it is not a chat model on its own — load it together with its model",
        )
    try:
        info = gguf.model_info(header)
    except GGUFError as exc:
        return _entry(p, "gguf", False, f"Unusable GGUF: {exc.message}", hints=hints)
    kind = "gguf-split" if len(paths) > 1 else "gguf"
    quant = info.file_type or hints.quant
    what = f"{info.architecture}, {info.n_params / 1e9:.1f}B parameters" + (f", {quant}" if quant else "")
    parts = f" in {len(paths)} parts (loaded together)" if len(paths) > 1 else ""
    return Identified(
        path=str(paths[0]), kind=kind, runnable=True, files=files, size_bytes=size, quant=quant,
        name_hints=hints, info=info,
        explanation=f"GGUF model{parts} ({what}): the format st-bridge runs with llama.cpp, "
        "on CPU, GPU or both",
    )


def _legacy_ggml(p: Path) -> Identified:
    return _entry(
        p, "ggml-legacy", False,
        "Old GGML file (the format before GGUF, 2023): current llama.cpp cannot load it; "
        "download the GGUF version of this model",
    )


# --- Hugging Face folders: safetensors and pickles ---------------------------------------------------

def _hf_entries(folder: Path, files: list[Path]) -> list[Identified]:
    """Group the non-GGUF weight files of one folder: shards of one set become one entry."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        groups[_group_key(f)].append(f)
    config = _hf_config(folder)
    out = []
    for members in groups.values():
        members.sort()
        first = members[0]
        head = _head(first, 16)
        if first.suffix.lower() == ".safetensors":
            out.append(_identify_safetensors(members, config))
        elif head[:4] in gguf.LEGACY_MAGICS:
            out.append(_legacy_ggml(first))
        elif first.suffix.lower() in PICKLE_SUFFIXES:
            out.append(_identify_pickle(members))
        else:
            out.append(identify_file(first))
    return out


def _group_key(f: Path) -> str:
    """model-00001-of-00003.safetensors and its siblings share a key; other files stand alone."""
    m = SPLIT_RE.search(f.name)
    if m:
        return f.name[: m.start()] + f.name[m.end() :].lower() + f"/{m['count']}"
    return f.name


def _hf_config(folder: Path) -> dict[str, Any]:
    """config.json merged with the quantizer files older tools wrote beside it; {} when absent or broken."""
    config = _read_json(folder / "config.json")
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        quant = {}
        if (folder / "measurement.json").exists():
            quant = {"quant_method": "exl2"}
        elif isinstance(q := _read_json(folder / "quant_config.json"), dict) and q:
            quant = {"quant_method": "awq", "bits": q.get("w_bit"), **q}  # AutoAWQ
        elif isinstance(q := _read_json(folder / "quantize_config.json"), dict) and q:
            quant = {"quant_method": q.get("quant_method", "gptq"), **q}  # AutoGPTQ
    return {**config, "quantization_config": quant}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# What each GPU format is, for the explanation: (name, where it runs).
QUANT_FORMATS = {
    "gptq": ("GPTQ", "a GPU-only format for ExLlama/AutoGPTQ"),
    "awq": ("AWQ", "a GPU-only format for AutoAWQ/vLLM"),
    "exl2": ("EXL2", "a GPU-only format for ExLlamaV2/TabbyAPI"),
    "bitsandbytes": ("bitsandbytes", "quantized by Transformers on an NVIDIA GPU"),
    "fp8": ("FP8", "8-bit floats for recent data-centre GPUs (vLLM)"),
    "compressed-tensors": ("compressed-tensors", "a format for vLLM on GPUs"),
}


def _identify_safetensors(members: list[Path], config: dict[str, Any]) -> Identified:
    first = members[0]
    header = _safetensors_header(first)
    if header is None:
        return _entry(first, "unknown", False, "Not a valid safetensors file (truncated or corrupt)",
                      files=members)
    qconf = config.get("quantization_config") or {}
    method = str(qconf.get("quant_method") or _method_from_tensors(header) or "").lower()
    bits = _bits(qconf, method, first.parent.name + "/" + first.name)
    parts = ""
    if len(members) > 1:
        parts = f" in {len(members)} parts (all needed, with the config and tokenizer files)"
    if not method:
        return _entry(
            first, "safetensors", False,
            f"Unquantized safetensors{parts} (Hugging Face format, 16-bit weights for GPU loaders); "
            + GET_GGUF,
            files=members,
        )
    label, where = QUANT_FORMATS.get(method, (method, "a quantized format for GPU loaders"))
    bit_text = f" {bits:g}-bit" if bits else ""
    kind = method if method in QUANT_FORMATS else "safetensors-quantized"
    return _entry(
        first, kind, False, f"{label}{bit_text} safetensors{parts}: {where}; {GET_GGUF}",
        files=members, bits=bits,
    )


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file: 8-byte little-endian length, then JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_SAFETENSORS_HEADER or n + 8 > _size(path):
                return None
            data = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _method_from_tensors(header: dict[str, Any]) -> str | None:
    """Recognise the quant format from tensor names and dtypes when no config.json says."""
    names = [k for k in header if k != "__metadata__"]
    dtypes = {v.get("dtype") for v in header.values() if isinstance(v, dict)}
    has = lambda suffix: any(n.endswith(suffix) for n in names)  # noqa: E731
    if has(".q_weight") or has(".q_invperm"):
        return "exl2"
    if has(".qweight"):
        return "gptq" if has(".g_idx") else "awq"
    if has(".weight_packed"):
        return "compressed-tensors"
    if has(".absmax") or has(".quant_map") or has(".SCB"):
        return "bitsandbytes"
    if dtypes & {"F8_E4M3", "F8_E5M2"}:
        return "fp8"
    return None


def _bits(qconf: dict[str, Any], method: str, name: str) -> float | None:
    for key in ("bits", "w_bit", "num_bits"):
        if isinstance(qconf.get(key), int | float) and not isinstance(qconf.get(key), bool):
            return float(qconf[key])
    if qconf.get("load_in_4bit") or qconf.get("_load_in_4bit"):
        return 4.0
    if qconf.get("load_in_8bit") or qconf.get("_load_in_8bit") or method == "fp8":
        return 8.0
    if m := BPW_RE.search(name):
        return float(m["bits"])
    return None


def _pickle_container(head: bytes) -> bool:
    """A zip archive (torch.save since 1.6) or a raw pickle stream (protocol 2 to 5)."""
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _identify_pickle(members: list[Path]) -> Identified:
    first = members[0]
    if not _pickle_container(_head(first, 16)):
        return _entry(first, "unknown", False, "Not a model file st-bridge recognises (it runs .gguf files)",
                      files=members)
    parts = f" in {len(members)} parts" if len(members) > 1 else ""
    return _entry(
        first, "pytorch-pickle", False,
        f"PyTorch pickle checkpoint{parts}: an older format that can run any code when loaded, "
        f"so it is unsafe and st-bridge never opens it; {GET_GGUF}",
        files=members, unsafe=True,
    )


# --- helpers -----------------------------------------------------------------------------------------

def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _entry(
    path: Path, kind: str, runnable: bool, explanation: str, *, files: list[Path] | None = None,
    hints: NameHints | None = None, unsafe: bool = False, bits: float | None = None,
) -> Identified:
    members = files or [path]
    hints = hints or parse_name(path.name, path.parent.name)
    return Identified(
        path=str(path), kind=kind, runnable=runnable, explanation=explanation,
        files=[str(f) for f in members], size_bytes=sum(_size(f) for f in members), unsafe=unsafe,
        quant=hints.quant, bits=bits, name_hints=hints,
    )
