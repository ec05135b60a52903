"""GGUF header reader: metadata and tensor table, never the tensor data.

Reads GGUF v2/v3 from a local file or from any byte-range source (an HTTP range reader for the Hub),
so the planner can size a model before it is downloaded. Split shards (`-00001-of-00003.gguf`) are read
as one model. Everything read from the file is checked against hard limits before memory is spent on it:
a hostile or truncated header fails fast with a `GGUFError` that says what is wrong.

The `gguf` package supplies the ggml type table (block size, bytes per block); the parser itself is ours
because `gguf.GGUFReader` memory-maps a whole local file and cannot read from a range source.
"""

from __future__ import annotations

import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Magic bytes of the formats that came before GGUF (2023). llama.cpp no longer loads them.
LEGACY_MAGICS = {b"lmgg": "GGML", b"fmgg": "GGMF", b"tjgg": "GGJT"}

# Limits on what a header may claim. Real models stay far below these (the largest vocabularies have
# ~262k tokens, the largest MoE files ~50k tensors); anything above is corrupt or hostile.
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 20
MAX_ARRAY_LEN = 1 << 24
MAX_STRING_LEN = 1 << 24
MAX_DIMS = 4
MAX_DIM = 1 << 40
MAX_ELEMENTS = (1 << 63) - 1  # ggml counts elements in an int64
MAX_HEADER_BYTES = 512 << 20
MAX_LAYERS = 1 << 12
MAX_CHUNK = 16 << 20
# Arrays longer than this (scores, merges) are skipped over, not kept: only their length is needed.
KEEP_ARRAY_LEN = 1 << 12
# The token list is kept (BOS/EOS text) unless it is absurdly long.
KEEP_ARRAY_KEYS = frozenset({"tokenizer.ggml.tokens"})
KEEP_TOKENS_MAX = 1 << 20

# GGUF metadata value types.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(8, 13)
_SCALARS: dict[int, str] = {
    T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i",
    T_FLOAT32: "<f", T_BOOL: "<?", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d",
}

# ggml types that existed once and were removed from llama.cpp; files using them no longer load.
REMOVED_TYPES = {
    4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8",
    36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8",
}
# general.file_type values for the removed ARM repack quants (LlamaFileType no longer lists them).
REMOVED_FILE_TYPES = {33: "Q4_0_4_4", 34: "Q4_0_4_8", 35: "Q4_0_8_8"}
FILE_TYPE_GUESSED = 1024  # llama.cpp ORs this flag in when it guessed the file type

SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


class ByteSource(Protocol):
    """Anything that can return `size` bytes at `offset` (a file, an HTTP range reader)."""

    name: str

    def size(self) -> int | None: ...

    def read_at(self, offset: int, size: int) -> bytes: ...


class FileSource:
    """A local file read with positional reads (seek + read: works on every platform)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = self.path.name
        try:
            self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
            self._size = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            raise GGUFError(f"cannot open {self.path}: {exc.strerror or exc}") from exc

    def size(self) -> int | None:
        return self._size

    def read_at(self, offset: int, size: int) -> bytes:
        try:
            self._file.seek(offset)
            return self._file.read(size)
        except OSError as exc:
            raise GGUFError(f"cannot read {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class CallbackSource:
    """A byte-range source built from a function, e.g. an HTTP `Range:` request."""

    def __init__(self, name: str, read_at: Callable[[int, int], bytes], size: int | None = None) -> None:
        self.name = name
        self._read_at = read_at
        self._size = size

    def size(self) -> int | None:
        return self._size

    def read_at(self, offset: int, size: int) -> bytes:
        return self._read_at(offset, size)


class _Cursor:
    """Sequential reads over a ByteSource through a buffer, counting bytes fetched.

    The buffer holds [_buf_start, _buf_start + len(_buf)); `pos` may run past its end after a skip,
    and the next read fetches from `pos`. Fetches start at 256 KiB and double (capped), so a header
    of a few MB costs a handful of range requests.
    """

    def __init__(self, source: ByteSource, first_chunk: int = 256 << 10) -> None:
        self.source = source
        self.pos = 0
        self.total = source.size()
        self._buf = b""
        self._buf_start = 0
        self._chunk = first_chunk
        self.bytes_fetched = 0

    def _buf_end(self) -> int:
        return self._buf_start + len(self._buf)

    def _fill(self, need: int) -> None:
        """Make [pos, pos + need) available in the buffer, or raise: the file ends early."""
        if self.pos + need <= self._buf_end():
            return
        # Drop what was already consumed; keep the unread tail (if pos is still inside the buffer).
        if self.pos >= self._buf_end():
            self._buf, self._buf_start = b"", self.pos
        else:
            self._buf, self._buf_start = self._buf[self.pos - self._buf_start :], self.pos
        # Loop: a range source may answer with fewer bytes than asked.
        while self._buf_end() < self.pos + need:
            at = self._buf_end()
            want = max(self.pos + need - at, self._chunk)
            self._chunk = min(self._chunk * 2, MAX_CHUNK)
            if self.total is not None:
                want = min(want, self.total - at)
            data = self.source.read_at(at, want) if want > 0 else b""
            if not data:
                break
            self.bytes_fetched += len(data)
            self._buf += data
        if self._buf_end() < self.pos + need:
            raise GGUFError(
                f"{self.source.name}: the file ends early at byte {self._buf_end()} while reading the header "
                f"(needed byte {self.pos + need}); it is truncated (an interrupted download?)"
            )

    def _check_limit(self, n: int) -> None:
        if self.pos + n > MAX_HEADER_BYTES:
            raise GGUFError(f"{self.source.name}: the header claims more than {MAX_HEADER_BYTES >> 20} MiB")

    def read(self, n: int) -> bytes:
        self._check_limit(n)
        self._fill(n)
        start = self.pos - self._buf_start
        self.pos += n
        return self._buf[start : start + n]

    def skip(self, n: int) -> None:
        """Move past n bytes; when the size is known they are never fetched (long arrays)."""
        if self.total is None:
            self.read(n)
            return
        self._check_limit(n)
        if self.pos + n > self.total:
            self._fill(n)  # raises the "ends early" error
        self.pos += n

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.read(size))[0]

    def remaining(self) -> int | None:
        return None if self.total is None else self.total - self.pos


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    ggml_type: int
    offset: int  # from the start of the data section of its shard
    nbytes: int
    shard: int = 0

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFHeader:
    """The raw header of one model (all shards merged)."""

    name: str
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    array_lengths: dict[str, int] = field(default_factory=dict)
    file_size: int | None = None
    data_offset: int = 0  # of the first shard; see shard_data_offsets for the others
    bytes_read: int = 0
    shard_count: int = 1
    shard_data_offsets: list[int] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def tensor_nbytes(ggml_type: int, shape: Sequence[int]) -> int:
    """Exact byte size of a tensor of this type and shape (ggml_nbytes for a contiguous tensor)."""
    if ggml_type in REMOVED_TYPES:
        raise GGUFError(
            f"tensor type {REMOVED_TYPES[ggml_type]} was removed from llama.cpp; "
            "this file no longer loads (download a current quant, e.g. Q4_0 instead of Q4_0_4_4)"
        )
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError) as exc:
        raise GGUFError(
            f"unknown tensor type {ggml_type}: the file "
            "is corrupt or newer than this reader"
        ) from exc
    if not shape:
        return type_size
    if shape[0] % block:
        raise GGUFError(f"tensor row of {shape[0]} is not a multiple of the {qtype.name} block size {block}")
    rows = 1
    for d in shape[1:]:
        rows *= d
    return shape[0] // block * type_size * rows


def _read_string(cur: _Cursor, what: str, strict: bool = False) -> str:
    """A length-prefixed string. Names (keys, tensors) must be UTF-8; values are shown with
    replacement characters, since llama.cpp itself treats them as bytes."""
    at = cur.pos
    n = cur.unpack("<Q")
    if n > MAX_STRING_LEN:
        raise GGUFError(
            f"{cur.source.name}: {what} claims to be {n} "
            "bytes long, more than any real header holds"
        )
    left = cur.remaining()
    if left is not None and n > left:
        raise GGUFError(f"{cur.source.name}: {what} claims {n} bytes at byte {at}, past the end of the file")
    raw = cur.read(n)
    try:
        return raw.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError:
        raise GGUFError(
            f"{cur.source.name}: {what} at byte {at} is "
            "not valid UTF-8 text; the file is corrupt"
        ) from None


def _skip_string(cur: _Cursor, what: str) -> None:
    n = cur.unpack("<Q")
    if n > MAX_STRING_LEN:
        raise GGUFError(
            f"{cur.source.name}: {what} claims to be {n} "
            "bytes long, more than any real header holds"
        )
    cur.skip(n)


def _check_array_fits(cur: _Cursor, count: int, min_elem: int, key: str) -> None:
    if count > MAX_ARRAY_LEN:
        raise GGUFError(
            f"{cur.source.name}: array {key!r} claims "
            f"{count} elements, more than any real model has"
        )
    left = cur.remaining()
    if left is not None and count * min_elem > left:
        raise GGUFError(f"{cur.source.name}: array {key!r} claims {count} elements, more than the file holds")


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> tuple[Any, int | None]:
    """Returns (value, array_length). Long arrays come back as None with their length."""
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype]), None
    if vtype == T_STRING:
        return _read_string(cur, f"the value of {key!r}"), None
    if vtype != T_ARRAY:
        raise GGUFError(f"{cur.source.name}: key {key!r} has unknown value type {vtype}; the file is corrupt")
    if depth > 1:
        raise GGUFError(
            f"{cur.source.name}: key {key!r} nests arrays "
            "more than two deep; the file is corrupt"
        )
    elem_type = cur.unpack("<I")
    count = cur.unpack("<Q")
    keep = count <= KEEP_ARRAY_LEN or (key in KEEP_ARRAY_KEYS and count <= KEEP_TOKENS_MAX)
    if elem_type in _SCALARS:
        fmt = _SCALARS[elem_type]
        size = struct.calcsize(fmt)
        _check_array_fits(cur, count, size, key)
        if not keep:
            cur.skip(size * count)
            return None, count
        return list(struct.unpack(f"<{count}{fmt[1]}", cur.read(size * count))), count
    if elem_type == T_STRING:
        _check_array_fits(cur, count, 8, key)
        if not keep:
            for _ in range(count):
                _skip_string(cur, f"an element of {key!r}")
            return None, count
        return [_read_string(cur, f"an element of {key!r}") for _ in range(count)], count
    if elem_type == T_ARRAY:
        _check_array_fits(cur, count, 12, key)
        items = [_read_value(cur, T_ARRAY, key, depth + 1)[0] for _ in range(count)]
        return (items if keep else None), count
    raise GGUFError(
        f"{cur.source.name}: array {key!r} has unknown "
        f"element type {elem_type}; the file is corrupt"
    )


def _read_preamble(cur: _Cursor) -> tuple[int, int, int]:
    """Magic, version and the two counts; the errors say what the file is if it is not GGUF."""
    name = cur.source.name
    size = cur.total
    if size is not None and size < 4:
        raise GGUFError(f"{name} is not a GGUF file: it is only {size} bytes long")
    magic = cur.read(4)
    if magic in LEGACY_MAGICS:
        raise GGUFError(
            f"{name} is an old {LEGACY_MAGICS[magic]} file (the format before GGUF, 2023); "
            "llama.cpp no longer loads it: download the GGUF version of this model"
        )
    if magic != GGUF_MAGIC:
        raise GGUFError(
            f"{name} is not a GGUF file (it starts with "
            f"{magic!r}, a GGUF file starts with b'GGUF')"
        )
    version = cur.unpack("<I")
    if version == 1:
        raise GGUFError(
            f"{name} is GGUF version 1 (2023), which "
            "llama.cpp no longer loads; download a newer file"
        )
    if version not in (2, 3):
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
            raise GGUFError(
                f"{name} is a big-endian GGUF (made for IBM "
                "mainframes); it cannot run on this machine"
            )
        raise GGUFError(
            f"{name}: GGUF version {version} is not "
            "supported (only 2 and 3); the file is corrupt"
        )
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    if n_tensors > MAX_TENSOR_COUNT or n_kv > MAX_KV_COUNT:
        raise GGUFError(
            f"{name}: the header claims {n_tensors} tensors "
            f"and {n_kv} keys; not a real model file"
        )
    return version, n_tensors, n_kv


def read_header(source: ByteSource, shard: int = 0) -> GGUFHeader:
    """Read one GGUF file's header and tensor table from a byte source."""
    cur = _Cursor(source)
    version, n_tensors, n_kv = _read_preamble(cur)

    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = _read_string(cur, "a metadata key", strict=True)
        if key in metadata:
            raise GGUFError(f"{source.name}: metadata key {key!r} appears twice; the file is corrupt")
        vtype = cur.unpack("<I")
        value, length = _read_value(cur, vtype, key)
        metadata[key] = value
        if length is not None:
            lengths[key] = length

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{source.name}: general.alignment {alignment!r} is not a power of two")

    left = cur.remaining()
    if left is not None and n_tensors * 24 > left:
        raise GGUFError(f"{source.name}: the header claims {n_tensors} tensors, more than the file holds")
    tensors = _read_tensor_table(cur, n_tensors, alignment, shard)

    data_offset = -(-cur.pos // alignment) * alignment
    header = GGUFHeader(
        name=source.name, version=version, metadata=metadata, tensors=tensors, array_lengths=lengths,
        file_size=source.size(), data_offset=data_offset, bytes_read=cur.bytes_fetched,
        shard_data_offsets=[data_offset],
    )
    _check_tensor_bounds(header)
    return header


def _read_tensor_table(cur: _Cursor, n_tensors: int, alignment: int, shard: int) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        t = _read_tensor_info(cur, shard)
        if t.name in seen:
            raise GGUFError(f"{cur.source.name}: tensor {t.name!r} appears twice; the file is corrupt")
        if t.offset % alignment:
            raise GGUFError(
                f"{cur.source.name}: tensor {t.name!r} starts at offset {t.offset}, "
                f"not a multiple of the alignment {alignment}; the file is corrupt"
            )
        seen.add(t.name)
        tensors.append(t)
    return tensors


def _read_tensor_info(cur: _Cursor, shard: int) -> TensorInfo:
    name = _read_string(cur, "a tensor name", strict=True)
    n_dims = cur.unpack("<I")
    if n_dims > MAX_DIMS:
        raise GGUFError(
            f"{cur.source.name}: tensor {name!r} has "
            f"{n_dims} dimensions (ggml allows {MAX_DIMS})"
        )
    shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
    n_elements = 1
    for d in shape:
        n_elements *= d
    if any(d > MAX_DIM for d in shape) or n_elements > MAX_ELEMENTS:
        raise GGUFError(f"{cur.source.name}: tensor {name!r} has an absurd shape {list(shape)}")
    ggml_type = cur.unpack("<I")
    offset = cur.unpack("<Q")
    try:
        nbytes = tensor_nbytes(ggml_type, shape)
    except GGUFError as exc:
        raise GGUFError(f"{cur.source.name}: tensor {name!r}: {exc.message}") from None
    return TensorInfo(name=name, shape=shape, ggml_type=ggml_type, offset=offset, nbytes=nbytes, shard=shard)


def _check_tensor_bounds(header: GGUFHeader) -> None:
    """A file whose tensors reach past its end is truncated; say so before anything loads it."""
    if header.file_size is None:
        return
    for t in header.tensors:
        end = header.data_offset + t.offset + t.nbytes
        if end > header.file_size:
            raise GGUFError(
                f"{header.name} is truncated: tensor {t.name!r} ends at byte {end} "
                f"but the file has {header.file_size} bytes (an interrupted download?)"
            )


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split model given any one of them, in order; [path] for a single file."""
    m = SHARD_RE.match(path.name)
    if not m:
        return [path]
    no, count = int(m["no"]), int(m["count"])
    if count < 1 or not 1 <= no <= count:
        raise GGUFError(f"{path.name}: part {no} of {count} is not a valid split-file name")
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise GGUFError(
            f"{path.name} is part {no} of a model split into {count} files; missing: {', '.join(missing)} "
            "(download every part into the same folder)"
        )
    return paths


def merge_shards(headers: list[GGUFHeader]) -> GGUFHeader:
    """One header for a split model: metadata of the first shard, tensors of all."""
    first = headers[0]
    expected = first.get("split.count", len(headers))
    if expected != len(headers):
        raise GGUFError(f"{first.name} says the model has {expected} parts, {len(headers)} were given")
    for i, h in enumerate(headers):
        no = h.get("split.no", i)
        if no != i:
            raise GGUFError(
                f"{h.name} says it is part "
                f"{no + 1 if isinstance(no, int) else no}, expected part {i + 1}"
            )
    merged = GGUFHeader(
        name=first.name, version=first.version, metadata=dict(first.metadata),
        tensors=[t for h in headers for t in h.tensors], array_lengths=dict(first.array_lengths),
        file_size=sum(h.file_size or 0 for h in headers) if all(h.file_size for h in headers) else None,
        data_offset=first.data_offset, bytes_read=sum(h.bytes_read for h in headers),
        shard_count=len(headers), shard_data_offsets=[h.data_offset for h in headers],
    )
    names = [t.name for t in merged.tensors]
    if len(set(names)) != len(names):
        dup = next(n for n, c in Counter(names).items() if c > 1)
        raise GGUFError(f"{first.name}: tensor {dup!r} appears in more than one part; the parts do not match")
    expected_tensors = first.get("split.tensors.count")
    if expected_tensors is not None and expected_tensors != len(merged.tensors):
        raise GGUFError(
            f"{first.name}: the parts hold {len(merged.tensors)} "
            f"tensors, {expected_tensors} expected"
        )
    return merged


def read_file(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read a local GGUF (any shard of a split model reads the whole model)."""
    paths = shard_paths(Path(path))
    headers = []
    for i, p in enumerate(paths):
        with FileSource(p) as src:
            headers.append(read_header(src, shard=i))
    return headers[0] if len(headers) == 1 else merge_shards(headers)


def read_sources(sources: Sequence[ByteSource]) -> GGUFHeader:
    """Read a model from range sources (one per shard, in order)."""
    if not sources:
        raise GGUFError("no GGUF source was given")
    headers = [read_header(s, shard=i) for i, s in enumerate(sources)]
    return headers[0] if len(headers) == 1 else merge_shards(headers)


# --------------------------------------------------------------------------------------------------
# ModelInfo: what the planner and the recommender need, derived from the header.

# llama.cpp hard-codes the sliding-window pattern of some architectures (llama-model.cpp,
# `set_swa_pattern`): with pattern n, layer il uses the window when il % n < n - 1.
SWA_PATTERN_BY_ARCH = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "gpt-oss": 2, "exaone4": 4}
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})


@dataclass
class ModelInfo:
    architecture: str
    name: str | None
    n_params: int
    n_params_active: int
    n_layer: int
    n_embd: int
    n_head: list[int]  # per layer
    n_head_kv: list[int]  # per layer; 0 for layers without attention (recurrent, or DeciLM's no-op layers)
    head_dim_k: int  # elements of K per head; for MLA the cached latent width (kv_lora_rank + rope_dim)
    head_dim_v: int
    n_ff: list[int]  # per layer
    n_vocab: int
    n_ctx_train: int
    n_expert: int = 0
    n_expert_used: int = 0
    sliding_window: int = 0
    swa_layers: list[bool] = field(default_factory=list)
    # MLA: set only when llama.cpp caches the compressed latent (K only). Legacy DeepSeek files (one
    # `attn_kv_b` tensor, no `key_length_mla`) run as ordinary attention with full K and V: 0 here.
    kv_lora_rank: int = 0
    rope_dim: int = 0
    recurrent_layers: list[bool] = field(default_factory=list)
    n_embd_r: int = 0  # recurrent state per sequence (conv / token shift), elements
    n_embd_s: int = 0  # recurrent state per sequence (ssm / wkv), elements
    tied_output: bool = False
    file_type: str | None = None
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    size_bytes: int = 0  # tensor bytes (the file is this plus the header)
    shard_count: int = 1
    n_ff_expert: int = 0  # feed-forward width of one expert (MoE)
    n_expert_shared: int = 0
    n_layer_dense_lead: int = 0  # leading layers with a dense FFN instead of experts (DeepSeek)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 1

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_recurrent(self) -> bool:
        return any(self.recurrent_layers)

    def describe(self) -> str:
        parts = [self.architecture, f"{self.n_params / 1e9:.2f}B params"]
        if self.is_moe:
            parts.append(
                f"{self.n_expert} experts, {self.n_expert_used} "
                f"active ({self.n_params_active / 1e9:.1f}B)"
            )
        parts += [f"{self.n_layer} layers", f"ctx {self.n_ctx_train}"]
        if self.file_type:
            parts.append(self.file_type)
        return ", ".join(parts)


class _Meta:
    """Typed access to one architecture's metadata keys, with errors that name the key."""

    def __init__(self, header: GGUFHeader, arch: str) -> None:
        self.md = header.metadata
        self.name = header.name
        self.arch = arch

    def raw(self, suffix: str) -> Any:
        return self.md.get(f"{self.arch}.{suffix}")

    def uint(self, suffix: str, default: int = 0) -> int:
        value = self.raw(suffix)
        if value is None:
            return default
        if type(value) is not int or value < 0:
            raise GGUFError(f"{self.name}: {self.arch}.{suffix} should be a whole number, found {value!r}")
        return value

    def per_layer(self, suffix: str, n_layer: int, default: int) -> list[int]:
        value = self.raw(suffix)
        if value is None:
            return [default] * n_layer
        if isinstance(value, list):
            if len(value) != n_layer or any(type(v) is not int or v < 0 for v in value):
                raise GGUFError(
                    f"{self.name}: {self.arch}.{suffix} should hold {n_layer} whole numbers (one per layer)"
                )
            return list(value)
        return [self.uint(suffix)] * n_layer


def _is_expert_tensor(name: str) -> bool:
    # Stacked experts (`ffn_up_exps`) or Mixtral's older one-tensor-per-expert layout (`ffn_up.3.weight`).
    return "_exps." in name or re.search(r"\.ffn_(gate|up|down)\.\d+\.weight$", name) is not None


def file_type_name(value: Any) -> str | None:
    if type(value) is not int:
        return None
    value &= ~FILE_TYPE_GUESSED
    if value in REMOVED_FILE_TYPES:
        return REMOVED_FILE_TYPES[value]
    try:
        name = LlamaFileType(value).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").replace("MXFP4_MOE", "MXFP4")


def model_info(header: GGUFHeader) -> ModelInfo:
    """Derive the shape a planner needs. Missing essentials raise a GGUFError that names the key."""
    md = header.metadata
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError(f"{header.name}: no general.architecture; not a model file llama.cpp can load")
    if arch == "clip":
        raise GGUFError(
            f"{header.name} is a multimodal projector (mmproj), not a model: it is loaded next to a model "
            "of the same family to let it see images"
        )
    meta = _Meta(header, arch)
    n_layer = meta.uint("block_count")
    n_embd = meta.uint("embedding_length")
    if n_layer <= 0 or n_embd <= 0:
        raise GGUFError(
            f"{header.name}: missing {arch}.block_count or "
            f"{arch}.embedding_length; not a complete model"
        )
    if n_layer > MAX_LAYERS:
        raise GGUFError(f"{header.name}: {arch}.block_count is {n_layer}; no real model has that many layers")

    n_head = meta.per_layer("attention.head_count", n_layer, 0)
    n_head_kv = meta.per_layer("attention.head_count_kv", n_layer, 0)
    if meta.raw("attention.head_count_kv") is None:
        n_head_kv = list(n_head)
    first_heads = next((h for h in n_head if h), 1)
    head_dim_k = meta.uint("attention.key_length", n_embd // first_heads)
    head_dim_v = meta.uint("attention.value_length", n_embd // first_heads)
    kv_lora_rank, rope_dim = _mla_shape(meta)

    vocab = header.array_lengths.get("tokenizer.ggml.tokens") or meta.uint("vocab_size")
    tokens = md.get("tokenizer.ggml.tokens") or []
    output = next((t for t in header.tensors if t.name == "output.weight"), None)
    embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if not vocab and embd is not None and len(embd.shape) == 2:
        vocab = embd.shape[1]

    n_params = sum(t.n_elements for t in header.tensors)
    n_expert = meta.uint("expert_count")
    n_expert_used = meta.uint("expert_used_count")
    active = n_params
    if n_expert > 1 and n_expert_used:
        expert_params = sum(t.n_elements for t in header.tensors if _is_expert_tensor(t.name))
        active = n_params - expert_params + expert_params * min(n_expert_used, n_expert) // n_expert

    sliding_window = meta.uint("attention.sliding_window")
    swa_layers = swa_layers_for(meta.raw("attention.sliding_window_pattern"), arch, n_layer, sliding_window)
    recurrent_layers, n_embd_r, n_embd_s = _recurrent_shape(meta, n_layer, n_head_kv)
    # llama.cpp keeps no KV cache for recurrent layers, whatever the scalar head count says.
    n_head_kv = [0 if rec else h for h, rec in zip(n_head_kv, recurrent_layers, strict=True)]

    bos = md.get("tokenizer.ggml.bos_token_id")
    eos = md.get("tokenizer.ggml.eos_token_id")
    template = md.get("tokenizer.chat_template")
    return ModelInfo(
        architecture=arch,
        name=md.get("general.name") if isinstance(md.get("general.name"), str) else None,
        n_params=n_params,
        n_params_active=active,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_ff=meta.per_layer("feed_forward_length", n_layer, 0),
        n_vocab=int(vocab),
        n_ctx_train=meta.uint("context_length"),
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        sliding_window=sliding_window,
        swa_layers=swa_layers,
        kv_lora_rank=kv_lora_rank,
        rope_dim=rope_dim,
        recurrent_layers=recurrent_layers,
        n_embd_r=n_embd_r,
        n_embd_s=n_embd_s,
        tied_output=output is None,
        file_type=file_type_name(md.get("general.file_type")),
        chat_template=template if isinstance(template, str) else None,
        bos_token_id=bos if type(bos) is int else None,
        eos_token_id=eos if type(eos) is int else None,
        bos_token=tokens[bos] if type(bos) is int and 0 <= bos < len(tokens) else None,
        eos_token=tokens[eos] if type(eos) is int and 0 <= eos < len(tokens) else None,
        size_bytes=sum(t.nbytes for t in header.tensors),
        shard_count=header.shard_count,
        n_ff_expert=meta.uint("expert_feed_forward_length"),
        n_expert_shared=meta.uint("expert_shared_count"),
        n_layer_dense_lead=meta.uint("leading_dense_block_count"),
    )


def _mla_shape(meta: _Meta) -> tuple[int, int]:
    """(kv_lora_rank, rope_dim) when the cache holds MLA's compressed latent, else (0, 0).

    llama.cpp switches MLA on only for files converted with the split `attn_k_b`/`attn_v_b` tensors,
    which carry `attention.key_length_mla`; their `key_length` is then kv_lora_rank + rope_dim and
    `head_count_kv` is 1, so the ordinary per-layer K width is already right.
    """
    kv_lora_rank = meta.uint("attention.kv_lora_rank")
    if not kv_lora_rank or not meta.uint("attention.key_length_mla"):
        return 0, 0
    return kv_lora_rank, meta.uint("rope.dimension_count")


def swa_layers_for(pattern: Any, arch: str, n_layer: int, window: int) -> list[bool]:
    """Which layers llama.cpp runs with the sliding window: the GGUF's pattern, else the one llama.cpp
    hard-codes for the architecture; none for an architecture it runs with full attention."""
    if not window:
        return [False] * n_layer
    if isinstance(pattern, list):
        return [bool(p) for p in pattern][:n_layer] + [False] * max(0, n_layer - len(pattern))
    n = pattern if type(pattern) is int and pattern > 0 else SWA_PATTERN_BY_ARCH.get(arch, 0)
    if not n:
        # A window llama.cpp does not apply (e.g. Mistral-7B-v0.1 runs as plain llama): every layer keeps
        # the full context, which is also the safe assumption for a memory plan.
        return [False] * n_layer
    return [il % n < n - 1 for il in range(n_layer)]


def _recurrent_shape(meta: _Meta, n_layer: int, n_head_kv: list[int]) -> tuple[list[bool], int, int]:
    """Which layers keep a recurrent state, and its size per sequence (llama-hparams.cpp n_embd_r/s)."""
    n_embd = meta.uint("embedding_length")
    wkv_head = meta.uint("wkv.head_size")
    d_conv = meta.uint("ssm.conv_kernel")
    d_inner = meta.uint("ssm.inner_size")
    d_state = meta.uint("ssm.state_size")
    n_group = meta.uint("ssm.group_count")
    l_cache = meta.uint("shortconv.l_cache")
    if wkv_head:
        n_embd_r, n_embd_s = meta.uint("token_shift_count", 2) * n_embd, n_embd * wkv_head
    elif l_cache:
        n_embd_r, n_embd_s = n_embd * (l_cache - 1), 0
    elif d_inner:
        n_embd_r = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
        n_embd_s = d_state * d_inner
    else:
        return [False] * n_layer, 0, 0
    if meta.arch in RECURRENT_ARCHS:
        return [True] * n_layer, n_embd_r, n_embd_s
    interval = meta.uint("full_attention_interval")
    if interval:
        # Qwen3-Next style: every interval-th layer is full attention, the others recurrent.
        return [(il + 1) % interval != 0 for il in range(n_layer)], n_embd_r, n_embd_s
    # Other hybrids (Jamba, Nemotron-H, Granite-H, LFM2): the layers without KV heads are the recurrent ones.
    return [h == 0 for h in n_head_kv], n_embd_r, n_embd_s
