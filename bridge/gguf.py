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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Limits on what a header may claim. Real models stay far below these (the largest vocabularies have
# ~262k tokens, the largest MoE files ~50k tensors); anything above is corrupt or hostile.
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 20
MAX_ARRAY_LEN = 1 << 24
MAX_STRING_LEN = 1 << 24
MAX_DIMS = 4
MAX_DIM = 1 << 40
MAX_HEADER_BYTES = 512 << 20
# Arrays longer than this (token lists, merges) are skipped over, not kept: only their length is needed.
KEEP_ARRAY_LEN = 1 << 12
KEEP_ARRAY_KEYS = frozenset({"tokenizer.ggml.tokens"})

# GGUF metadata value types.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(8, 13)
_SCALARS: dict[int, str] = {
    T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i",
    T_FLOAT32: "<f", T_BOOL: "<?", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d",
}

SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


class ByteSource(Protocol):
    """Anything that can return `size` bytes at `offset` (a file, an HTTP range reader)."""

    name: str

    def size(self) -> int | None: ...

    def read_at(self, offset: int, size: int) -> bytes: ...


class FileSource:
    """A local file read with positional reads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = self.path.name
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise GGUFError(f"cannot open {self.path}: {exc.strerror}") from exc
        self._size = os.fstat(self._fd).st_size

    def size(self) -> int | None:
        return self._size

    def read_at(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        os.close(self._fd)

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
    """Sequential reads over a ByteSource through a growing buffer, counting bytes fetched."""

    def __init__(self, source: ByteSource, first_chunk: int = 256 << 10) -> None:
        self.source = source
        self.pos = 0
        self.total = source.size()
        self._buf = b""
        self._buf_start = 0
        self._chunk = first_chunk
        self.bytes_fetched = 0

    def _fill(self, need: int) -> None:
        end = self._buf_start + len(self._buf)
        missing = self.pos + need - end
        if missing <= 0:
            return
        want = max(missing, self._chunk)
        self._chunk = min(self._chunk * 2, 16 << 20)
        if self.total is not None:
            want = min(want, self.total - end)
        data = self.source.read_at(end, want) if want > 0 else b""
        self.bytes_fetched += len(data)
        keep_from = max(0, self.pos - self._buf_start)
        self._buf = self._buf[keep_from:] + data
        self._buf_start += keep_from
        if self.pos + need > self._buf_start + len(self._buf):
            raise GGUFError(
                f"{self.source.name}: the file ends early (truncated at byte "
                f"{self._buf_start + len(self._buf)}, needed byte {self.pos + need})"
            )

    def read(self, n: int) -> bytes:
        if self.pos + n > MAX_HEADER_BYTES:
            raise GGUFError(f"{self.source.name}: header larger than {MAX_HEADER_BYTES >> 20} MiB")
        self._fill(n)
        start = self.pos - self._buf_start
        self.pos += n
        return self._buf[start : start + n]

    def skip(self, n: int) -> None:
        self.read(n)

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
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

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
    data_offset: int = 0
    bytes_read: int = 0
    shard_count: int = 1

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def tensor_nbytes(ggml_type: int, shape: Sequence[int]) -> int:
    """Exact byte size of a tensor of this type and shape (ggml_nbytes for a contiguous tensor)."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError) as exc:
        raise GGUFError(f"unknown tensor type {ggml_type}: the file is corrupt or newer than this reader") from exc
    if not shape:
        return type_size
    if shape[0] % block:
        raise GGUFError(f"tensor row of {shape[0]} is not a multiple of the {qtype.name} block size {block}")
    rows = 1
    for d in shape[1:]:
        rows *= d
    return shape[0] // block * type_size * rows


def _read_string(cur: _Cursor) -> str:
    n = cur.unpack("<Q")
    if n > MAX_STRING_LEN:
        raise GGUFError(f"{cur.source.name}: a string claims {n} bytes, more than any real header holds")
    raw = cur.read(n)
    return raw.decode("utf-8", errors="replace")


def _check_array_fits(cur: _Cursor, count: int, min_elem: int, key: str) -> None:
    if count > MAX_ARRAY_LEN:
        raise GGUFError(f"{cur.source.name}: array {key!r} claims {count} elements")
    left = cur.remaining()
    if left is not None and count * min_elem > left:
        raise GGUFError(f"{cur.source.name}: array {key!r} claims {count} elements, more than the file holds")


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> tuple[Any, int | None]:
    """Returns (value, array_length). Long arrays come back as None with their length."""
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype]), None
    if vtype == T_STRING:
        return _read_string(cur), None
    if vtype != T_ARRAY:
        raise GGUFError(f"{cur.source.name}: key {key!r} has unknown value type {vtype}")
    if depth > 1:
        raise GGUFError(f"{cur.source.name}: key {key!r} nests arrays too deeply")
    elem_type = cur.unpack("<I")
    count = cur.unpack("<Q")
    keep = count <= KEEP_ARRAY_LEN or key in KEEP_ARRAY_KEYS
    if elem_type in _SCALARS:
        fmt = _SCALARS[elem_type]
        size = struct.calcsize(fmt)
        _check_array_fits(cur, count, size, key)
        raw = cur.read(size * count)
        if not keep:
            return None, count
        return list(struct.unpack(f"<{count}{fmt[1]}", raw)), count
    if elem_type == T_STRING:
        _check_array_fits(cur, count, 8, key)
        items = [_read_string(cur) for _ in range(count)]
        return (items if keep else None), count
    if elem_type == T_ARRAY:
        _check_array_fits(cur, count, 12, key)
        items = [_read_value(cur, T_ARRAY, key, depth + 1)[0] for _ in range(count)]
        return (items if keep else None), count
    raise GGUFError(f"{cur.source.name}: array {key!r} has unknown element type {elem_type}")


def read_header(source: ByteSource, shard: int = 0) -> GGUFHeader:
    """Read one GGUF file's header and tensor table from a byte source."""
    cur = _Cursor(source)
    if cur.read(4) != GGUF_MAGIC:
        raise GGUFError(f"{source.name} is not a GGUF file (wrong magic bytes)")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{source.name}: GGUF version {version} is not supported (only 2 and 3)")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    if n_tensors > MAX_TENSOR_COUNT or n_kv > MAX_KV_COUNT:
        raise GGUFError(f"{source.name}: header claims {n_tensors} tensors and {n_kv} keys; not a real model")

    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = _read_string(cur)
        vtype = cur.unpack("<I")
        value, length = _read_value(cur, vtype, key)
        metadata[key] = value
        if length is not None:
            lengths[key] = length

    left = cur.remaining()
    if left is not None and n_tensors * 24 > left:
        raise GGUFError(f"{source.name}: header claims {n_tensors} tensors, more than the file holds")
    tensors = [_read_tensor_info(cur, shard) for _ in range(n_tensors)]

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{source.name}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    header = GGUFHeader(
        name=source.name, version=version, metadata=metadata, tensors=tensors, array_lengths=lengths,
        file_size=source.size(), data_offset=data_offset, bytes_read=cur.bytes_fetched,
    )
    _check_tensor_bounds(header)
    return header


def _read_tensor_info(cur: _Cursor, shard: int) -> TensorInfo:
    name = _read_string(cur)
    n_dims = cur.unpack("<I")
    if n_dims > MAX_DIMS:
        raise GGUFError(f"{cur.source.name}: tensor {name!r} has {n_dims} dimensions (ggml allows {MAX_DIMS})")
    shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
    if any(d > MAX_DIM for d in shape):
        raise GGUFError(f"{cur.source.name}: tensor {name!r} has an absurd shape {shape}")
    ggml_type = cur.unpack("<I")
    offset = cur.unpack("<Q")
    try:
        nbytes = tensor_nbytes(ggml_type, shape)
    except GGUFError as exc:
        raise GGUFError(f"{cur.source.name}: tensor {name!r}: {exc.message}") from None
    return TensorInfo(name=name, shape=shape, ggml_type=ggml_type, offset=offset, nbytes=nbytes, shard=shard)


def _check_tensor_bounds(header: GGUFHeader) -> None:
    """A local file whose tensors reach past its end is truncated; say so before anything loads it."""
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
    count = int(m["count"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise GGUFError(f"{path.name} is part {m['no']} of {count}; missing: {', '.join(missing)}")
    return paths


def merge_shards(headers: list[GGUFHeader]) -> GGUFHeader:
    """One header for a split model: metadata of the first shard, tensors of all."""
    first = headers[0]
    expected = first.get("split.count", len(headers))
    if expected != len(headers):
        raise GGUFError(f"{first.name} says the model has {expected} parts, {len(headers)} were given")
    merged = GGUFHeader(
        name=first.name, version=first.version, metadata=dict(first.metadata),
        tensors=[t for h in headers for t in h.tensors], array_lengths=dict(first.array_lengths),
        file_size=sum(h.file_size or 0 for h in headers) if all(h.file_size for h in headers) else None,
        data_offset=first.data_offset, bytes_read=sum(h.bytes_read for h in headers), shard_count=len(headers),
    )
    expected_tensors = first.get("split.tensors.count")
    if expected_tensors is not None and expected_tensors != len(merged.tensors):
        raise GGUFError(f"{first.name}: the parts hold {len(merged.tensors)} tensors, {expected_tensors} expected")
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
    n_head_kv: list[int]  # per layer; 0 for layers without attention (recurrent)
    head_dim_k: int
    head_dim_v: int
    n_ff: list[int]  # per layer
    n_vocab: int
    n_ctx_train: int
    n_expert: int = 0
    n_expert_used: int = 0
    sliding_window: int = 0
    swa_layers: list[bool] = field(default_factory=list)
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

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 1

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def describe(self) -> str:
        parts = [self.architecture, f"{self.n_params / 1e9:.2f}B params"]
        if self.is_moe:
            parts.append(f"{self.n_expert} experts, {self.n_expert_used} active ({self.n_params_active / 1e9:.1f}B)")
        parts += [f"{self.n_layer} layers", f"ctx {self.n_ctx_train}"]
        if self.file_type:
            parts.append(self.file_type)
        return ", ".join(parts)


def _per_layer(value: Any, n_layer: int, default: int) -> list[int]:
    if value is None:
        return [default] * n_layer
    if isinstance(value, list):
        if len(value) != n_layer:
            raise GGUFError(f"a per-layer array has {len(value)} entries for {n_layer} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layer


def _is_expert_tensor(name: str) -> bool:
    # Stacked experts (`ffn_up_exps`) or Mixtral's older one-tensor-per-expert layout (`ffn_up.3.weight`).
    return "_exps." in name or re.search(r"\.ffn_(gate|up|down)\.\d+\.weight$", name) is not None


def file_type_name(value: Any) -> str | None:
    if not isinstance(value, int):
        return None
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

    def key(suffix: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{suffix}", default)

    n_layer = key("block_count")
    n_embd = key("embedding_length")
    if not isinstance(n_layer, int) or not isinstance(n_embd, int) or n_layer <= 0 or n_embd <= 0:
        raise GGUFError(f"{header.name}: missing or invalid {arch}.block_count / {arch}.embedding_length")

    n_head = _per_layer(key("attention.head_count"), n_layer, 0)
    n_head_kv = _per_layer(key("attention.head_count_kv"), n_layer, 0)
    if key("attention.head_count_kv") is None:
        n_head_kv = list(n_head)
    first_heads = next((h for h in n_head if h), 1)
    head_dim_k = int(key("attention.key_length", n_embd // first_heads))
    head_dim_v = int(key("attention.value_length", n_embd // first_heads))
    kv_lora_rank = int(key("attention.kv_lora_rank", 0) or 0)
    rope_dim = int(key("rope.dimension_count", head_dim_k) or 0)
    if kv_lora_rank:
        # MLA: the cache holds the compressed latent plus the rope part, once per layer (K only).
        head_dim_k = kv_lora_rank + rope_dim
        head_dim_v = kv_lora_rank

    vocab = header.array_lengths.get("tokenizer.ggml.tokens") or key("vocab_size") or 0
    tokens = md.get("tokenizer.ggml.tokens") or []
    output = next((t for t in header.tensors if t.name == "output.weight"), None)
    embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if not vocab and embd is not None and len(embd.shape) == 2:
        vocab = embd.shape[1]

    n_params = sum(t.n_elements for t in header.tensors)
    n_expert = int(key("expert_count", 0) or 0)
    n_expert_used = int(key("expert_used_count", 0) or 0)
    active = n_params
    if n_expert > 1 and n_expert_used:
        expert_params = sum(t.n_elements for t in header.tensors if _is_expert_tensor(t.name))
        active = n_params - expert_params + expert_params * n_expert_used // n_expert

    sliding_window = int(key("attention.sliding_window", 0) or 0)
    swa_layers = _swa_layers(key("attention.sliding_window_pattern"), arch, n_layer, sliding_window)
    recurrent_layers, n_embd_r, n_embd_s = _recurrent_shape(arch, key, n_layer, n_embd, n_head_kv)

    bos = md.get("tokenizer.ggml.bos_token_id")
    eos = md.get("tokenizer.ggml.eos_token_id")
    return ModelInfo(
        architecture=arch,
        name=md.get("general.name"),
        n_params=n_params,
        n_params_active=active,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_ff=_per_layer(key("feed_forward_length"), n_layer, 0),
        n_vocab=int(vocab),
        n_ctx_train=int(key("context_length", 0) or 0),
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        sliding_window=sliding_window,
        swa_layers=swa_layers,
        kv_lora_rank=kv_lora_rank,
        rope_dim=rope_dim if kv_lora_rank else 0,
        recurrent_layers=recurrent_layers,
        n_embd_r=n_embd_r,
        n_embd_s=n_embd_s,
        tied_output=output is None,
        file_type=file_type_name(md.get("general.file_type")),
        chat_template=md.get("tokenizer.chat_template"),
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_id=eos if isinstance(eos, int) else None,
        bos_token=tokens[bos] if isinstance(bos, int) and 0 <= bos < len(tokens) else None,
        eos_token=tokens[eos] if isinstance(eos, int) and 0 <= eos < len(tokens) else None,
        size_bytes=sum(t.nbytes for t in header.tensors),
        shard_count=header.shard_count,
    )


def _swa_layers(pattern: Any, arch: str, n_layer: int, window: int) -> list[bool]:
    if not window:
        return [False] * n_layer
    if isinstance(pattern, list):
        return [bool(p) for p in pattern][:n_layer] + [False] * max(0, n_layer - len(pattern))
    n = int(pattern) if isinstance(pattern, int) and pattern > 0 else SWA_PATTERN_BY_ARCH.get(arch, 0)
    if not n:
        return [True] * n_layer  # a window with no pattern: every layer slides (e.g. Mistral v0.1)
    return [il % n < n - 1 for il in range(n_layer)]


def _recurrent_shape(
    arch: str, key: Callable[..., Any], n_layer: int, n_embd: int, n_head_kv: list[int]
) -> tuple[list[bool], int, int]:
    """Which layers keep a recurrent state, and its size per sequence (llama-hparams.cpp n_embd_r/s)."""
    wkv_head = int(key("wkv.head_size", 0) or 0)
    d_conv = int(key("ssm.conv_kernel", 0) or 0)
    d_inner = int(key("ssm.inner_size", 0) or 0)
    d_state = int(key("ssm.state_size", 0) or 0)
    n_group = int(key("ssm.group_count", 0) or 0)
    l_cache = int(key("shortconv.l_cache", 0) or 0)
    if wkv_head:
        token_shift = int(key("token_shift_count", 2) or 2)
        n_embd_r, n_embd_s = token_shift * n_embd, n_embd * wkv_head
    elif l_cache:
        n_embd_r, n_embd_s = n_embd * (l_cache - 1), 0
    elif d_inner:
        n_embd_r = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
        n_embd_s = d_state * d_inner
    else:
        return [False] * n_layer, 0, 0
    if arch in RECURRENT_ARCHS:
        return [True] * n_layer, n_embd_r, n_embd_s
    # Hybrid models: the layers without attention heads are the recurrent ones.
    return [h == 0 for h in n_head_kv], n_embd_r, n_embd_s


def inspect_path(path: str | os.PathLike[str]) -> ModelInfo:
    return model_info(read_file(path))
