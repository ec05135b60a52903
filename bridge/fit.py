"""The memory planner: how much memory a GGUF model needs on each device, and where it should run.

Pure functions over the GGUF tensor table, `ModelInfo`, a `HardwareReport` and the run settings. It
replicates llama.cpp's allocation rules where they are deterministic (weights placement, KV cache
sizes) and models the compute buffers with formulas calibrated against llama.cpp's own dry runs
(see the reference table in tests/test_fit_calibration.py). Nothing is loaded and no GPU is needed.

Layout of this module, top to bottom:
  1. settings (`FitParams`) and the model's per-layer byte table (`ModelLayout`);
  2. placement: which device holds each layer (llama.cpp's `-ngl` and multi-GPU split rules);
  3. the KV cache, the compute buffers and the fixed overheads;
  4. `memory_breakdown`: MiB per device for one configuration, worked out by `LayerTable` from per-layer
     figures computed once per model, so the searches of section 5 stay cheap over a whole catalog;
  5. `plan`: the search over GPU layers, KV type and context, and the verdict with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from itertools import accumulate

from gguf.constants import GGMLQuantizationType as Q

from .devices.placement import DevicePlacement
from .errors import BadRequest
from .gguf import GGUFHeader, ModelInfo, TensorInfo, model_info
from .hardware import GPUInfo, HardwareReport, gb, short_gpu_name

MIB = 1 << 20
CTX_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of 256 (llama-context.cpp, GGML_PAD)
DEFAULT_CTX = 8192

# Per-process GPU memory that llama.cpp does not log: the CUDA context, cuBLAS workspace and the memory
# pool floor. Measured on an H100 (CUDA 13) as nvidia-smi's per-process peak minus the sum of
# llama.cpp's buffers: +592 (8k, flash attention), +686 (32k, no flash attention), +593 (partial
# offload), +592 MiB (128k, q8_0 KV). The outlier is covered by the safety margin.
CUDA_CONTEXT_MIB = 600
GPU_MARGIN_MIN_MIB = 512
GPU_MARGIN_FRACTION = 0.04
RAM_MARGIN_MIN_MIB = 512
RAM_MARGIN_FRACTION = 0.05

# Host memory of llama.cpp's own structures once a model is loaded: tensor metadata, graph and scheduler
# state, and the vocabulary tables (token text, scores, maps, the token-to-piece cache). Measured with
# llama-cpp-python 0.3.36 as the anonymous memory a load adds beyond its buffers: ~2-3 MiB for a
# 640-token vocabulary, ~15 MiB for a 32000-token one (tests/test_fit_host_memory.py).
HOST_BASE_MIB = 2.0
VOCAB_BYTES_PER_TOKEN = 400

# KV cache element types: (bytes per block, elements per block), ggml type traits.
KV_TYPES: dict[str, tuple[int, int]] = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}
FLASH_ATTN_MODES = ("on", "off", "auto")

# Matrices the CPU backend copies into an interleaved layout on AVX2 machines (ggml-cpu repack.cpp):
# they then live in anonymous memory, and their pages in the mapped file become reclaimable page cache.
REPACK_TYPES = frozenset({Q.Q4_0, Q.Q4_K, Q.IQ4_NL})
REPACK_ROWS = 8  # the interleave width: a matrix whose row count is not a multiple of it stays as is

QUANTIZED_V_EXTRA_FROM_CTX = 4096

BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
EXPERT_RE = re.compile(r"_exps\.|\.ffn_(gate|up|down)\.\d+\.weight$")
OUTPUT_NAMES = ("output.", "output_norm.")

Verdict = str  # "full_gpu" | "partial_gpu" | "cpu_only" | "wont_fit"


# --- 1. settings and the model's byte table -----------------------------------------------------------

@dataclass(frozen=True)
class FitParams:
    """Run settings, as llama.cpp takes them. `gpu_layers=None` means "all" for a breakdown and "find the
    most that fit" for a plan; `kv_type_k/v=None` means f16, or q8_0 when only that makes a plan fit."""

    n_ctx: int | None = None  # None: DEFAULT_CTX, capped by the model's trained context
    n_ubatch: int = 512
    n_batch: int = 2048
    kv_type_k: str | None = None
    kv_type_v: str | None = None
    flash_attn: str = "auto"
    gpu_layers: int | None = None
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    n_seq: int = 1
    swa_full: bool = False
    # RAM the bridge keeps beside the model (the per-chat memory store): taken off the RAM budget.
    extra_host_mib: float = 0.0


@dataclass(frozen=True)
class Matrix:
    """One weight tensor as the planner sees it."""

    nbytes: int
    rows: int  # output features (shape[1]); for stacked experts, per expert
    expert: bool
    repackable: bool


@dataclass
class ModelLayout:
    """The tensor table grouped the way llama.cpp places it: input, blocks, output."""

    info: ModelInfo
    blocks: list[list[Matrix]]
    output: list[Matrix]
    token_embd: int  # bytes
    input_other: int  # other tensors of the input layer (rope factors, embedding norms)
    total_bytes: int

    @classmethod
    def from_header(cls, header: GGUFHeader, info: ModelInfo | None = None) -> ModelLayout:
        info = info or model_info(header)
        blocks: list[list[Matrix]] = [[] for _ in range(info.n_layer)]
        output: list[Matrix] = []
        token_embd = input_other = 0
        for t in header.tensors:
            block = BLOCK_RE.match(t.name)
            if block and int(block[1]) < info.n_layer:
                blocks[int(block[1])].append(_matrix(t))
            elif t.name.startswith(OUTPUT_NAMES):
                output.append(_matrix(t))
            elif t.name.startswith("token_embd."):
                token_embd += t.nbytes
            else:
                input_other += t.nbytes
        return cls(info, blocks, output, token_embd, input_other, sum(t.nbytes for t in header.tensors))


def _matrix(t: TensorInfo) -> Matrix:
    rows = t.shape[1] if len(t.shape) >= 2 else 1
    repackable = len(t.shape) == 2 and t.ggml_type in REPACK_TYPES and rows % REPACK_ROWS == 0
    return Matrix(t.nbytes, rows, EXPERT_RE.search(t.name) is not None, repackable)


def as_layout(model: ModelLayout | GGUFHeader) -> ModelLayout:
    return model if isinstance(model, ModelLayout) else ModelLayout.from_header(model)


def pad_ctx(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def mib(n_bytes: float) -> float:
    return n_bytes / MIB


# --- 2. placement ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Device of each block and of the output layer: -1 is the host, 0.. a GPU."""

    blocks: list[int]
    output: int
    experts_on_host: list[bool]  # per block: routed experts kept in RAM (--cpu-moe / --n-cpu-moe)

    def gpu_of(self, il: int) -> int:
        return self.output if il == len(self.blocks) else self.blocks[il]


def place(n_layer: int, gpu_layers: int, gpu_free: Sequence[float], n_cpu_moe: int = 0) -> Placement:
    """llama.cpp's rule (llama-model.cpp, load_tensors): `-ngl N` offloads the last N "layers" where the
    output layer counts as one, so N-1 blocks plus the output; the offloaded range is split over the GPUs
    by layer count in proportion to their free memory, the last GPU taking the output layer."""
    n_gpu = len(gpu_free) if gpu_free else 0
    ngl = max(0, min(gpu_layers, n_layer + 1)) if n_gpu else 0
    start = n_layer + 1 - ngl
    splits = _cumulative_splits(gpu_free)
    devices = [_split_device(il, start, ngl, splits) for il in range(n_layer + 1)]
    experts = [il < n_cpu_moe for il in range(n_layer)]
    return Placement(blocks=devices[:n_layer], output=devices[n_layer], experts_on_host=experts)


def _cumulative_splits(gpu_free: Sequence[float]) -> list[float]:
    total = sum(max(f, 0) for f in gpu_free) or 1
    acc, splits = 0.0, []
    for f in gpu_free:
        acc += max(f, 0) / total
        splits.append(acc)
    return splits


def _split_device(il: int, start: int, ngl: int, splits: list[float]) -> int:
    if il < start or ngl == 0:
        return -1
    fraction = (il - start) / ngl
    # std::upper_bound: the first GPU whose cumulative share exceeds the layer's position.
    return next((g for g, s in enumerate(splits) if s > fraction), len(splits) - 1)


# --- 3. KV cache, compute buffers, overheads --------------------------------------------------------

@dataclass(frozen=True)
class Attention:
    """Resolved attention settings of one configuration."""

    n_ctx: int  # padded
    n_ubatch: int
    n_seq: int
    type_k: str
    type_v: str
    flash_attn: bool
    swa_full: bool

    @property
    def quantized_v(self) -> bool:
        return self.type_v != "f16"

    @property
    def quantized(self) -> bool:
        return self.type_k != "f16" or self.type_v != "f16"


def resolve_attention(params: FitParams, info: ModelInfo) -> Attention:
    """Apply llama.cpp's rules: a quantized V cache needs flash attention (forced on with `auto`, an error
    with `off`); MLA models need the same type for K and V; `auto` resolves to on (CUDA and CPU have it)."""
    type_k, type_v = params.kv_type_k or "f16", params.kv_type_v or params.kv_type_k or "f16"
    for t in (type_k, type_v):
        if t not in KV_TYPES:
            raise BadRequest(f"unknown KV cache type {t!r}; use one of {', '.join(KV_TYPES)}")
    if params.flash_attn not in FLASH_ATTN_MODES:
        raise BadRequest(f"flash attention must be on, off or auto (got {params.flash_attn!r})")
    if type_v != "f16" and params.flash_attn == "off":
        raise BadRequest(f"a {type_v} V cache needs flash attention: use flash attention on or auto, "
                         "or an f16 cache")
    if info.is_mla and type_k != type_v:
        raise BadRequest(f"{info.architecture} (MLA) needs the same type for the K and V caches")
    n_ctx = params.n_ctx or default_ctx(info)
    if n_ctx <= 0 or params.n_ubatch <= 0 or params.n_seq <= 0:
        raise BadRequest("context, ubatch and sequence count must be positive")
    return Attention(pad_ctx(n_ctx), params.n_ubatch, params.n_seq, type_k, type_v,
                     params.flash_attn != "off", params.swa_full)


def default_ctx(info: ModelInfo) -> int:
    return min(DEFAULT_CTX, info.n_ctx_train) if info.n_ctx_train else DEFAULT_CTX


def row_bytes(kv_type: str, n: int) -> float:
    size, block = KV_TYPES[kv_type]
    return n / block * size


def kv_cells(info: ModelInfo, att: Attention, il: int) -> int:
    """Cache cells of layer il: the padded context, or for a sliding-window layer the window plus one
    ubatch per sequence (llama-kv-cache-iswa.cpp) unless the full cache is asked for."""
    if att.swa_full or not (info.swa_layers and info.swa_layers[il]):
        return att.n_ctx
    per_seq = pad_ctx(min(att.n_ctx // att.n_seq, info.sliding_window + att.n_ubatch))
    return per_seq * att.n_seq


def kv_widths(info: ModelInfo, il: int) -> tuple[int, int]:
    """Elements per cell of K and V in layer il. MLA stores only K (the latent plus the rope part);
    recurrent layers and layers without KV heads store none."""
    if info.recurrent_layers and info.recurrent_layers[il]:
        return 0, 0
    if info.is_mla:
        return info.head_dim_k, 0
    heads = info.n_head_kv[il]
    return info.head_dim_k * heads, info.head_dim_v * heads


def kv_layer_bytes(info: ModelInfo, att: Attention, il: int) -> float:
    """K and V of one layer. Without flash attention V is stored transposed at the widest layer's width."""
    return _kv_layer_bytes(info, att, il, 0 if att.flash_attn else _widest_v(info))


def _widest_v(info: ModelInfo) -> int:
    return max((kv_widths(info, j)[1] for j in range(info.n_layer)), default=0)


def _kv_layer_bytes(info: ModelInfo, att: Attention, il: int, widest_v: int) -> float:
    w_k, w_v = kv_widths(info, il)
    if w_v and not att.flash_attn:
        w_v = widest_v
    cells = kv_cells(info, att, il)
    state = 0.0
    if info.recurrent_layers and info.recurrent_layers[il]:
        state = (info.n_embd_r + info.n_embd_s) * 4 * att.n_seq  # F32 state per sequence
    return cells * (row_bytes(att.type_k, w_k) + row_bytes(att.type_v, w_v)) + state


@dataclass(frozen=True)
class Activations:
    """Widths (elements per token) the compute graph of a set of layers works with."""

    n_embd: int
    ffn: int  # widest feed-forward activation: n_ff, or n_expert_used x expert width
    n_ff: int
    kq: int  # widest attention score row summed over heads: max over layers of n_kv(il) x n_head(il)
    dequant: float  # bytes of one layer's quantized K/V converted to f16 (GPU flash attention)


def activations(layout: ModelLayout, att: Attention, layers: Sequence[int]) -> Activations:
    info = layout.info
    ffn = max((_ffn_width(layout, il) for il in layers), default=0)
    attending = [il for il in layers if kv_widths(info, il)[0]]
    kq = max((kv_cells(info, att, il) * info.n_head[il] for il in attending), default=0)
    dequant = 0.0
    for il in layers:
        w_k, w_v = kv_widths(info, il)
        quantized = w_k * (att.type_k != "f16") + w_v * (att.type_v != "f16")
        dequant = max(dequant, kv_cells(info, att, il) * quantized * 2.0)
    n_ff = max((info.n_ff[il] for il in layers), default=0)
    return Activations(info.n_embd, ffn, n_ff, kq, dequant)


def _ffn_width(layout: ModelLayout, il: int) -> int:
    expert_rows = [m.rows for m in layout.blocks[il] if m.expert]
    return _ffn_width_of(layout.info, il, max(expert_rows) if expert_rows else None)


def _ffn_width_of(info: ModelInfo, il: int, expert_rows: int | None) -> int:
    if expert_rows is not None and info.n_expert_used:
        return info.n_expert_used * expert_rows  # gate/up rows of one expert: its hidden width
    return info.n_ff[il]


def gpu_compute_bytes(layout: ModelLayout, att: Attention, layers: Sequence[int], has_output: bool,
                      partial: bool) -> float:
    """One GPU's compute buffer: the peak of the phases of its graph (llama.cpp reserves the worst-case
    graph: one full ubatch against the whole context). Calibrated on an H100 (fit-reference 1.3):
    logits `(n_vocab + n_embd) x ubatch x 4 B` dominate with flash attention; without it the KQ scores
    `n_kv x ubatch x n_head x 4 B`; a quantized KV cache adds one layer's K/V converted to f16."""
    return _gpu_compute(layout.info, att, activations(layout, att, layers), bool(layers), has_output, partial)


def _gpu_compute(info: ModelInfo, att: Attention, a: Activations, layers: bool, has_output: bool,
                 partial: bool) -> float:
    u = att.n_ubatch
    phases = [4.0 * u * (info.n_vocab + a.n_embd)] if has_output else [0.0]
    if layers:
        phases.append(4.0 * u * (3 * a.ffn + 3 * a.n_embd))
        if att.flash_attn:
            phases.append(2.0 * u * att.n_ctx + 16.0 * u * a.n_embd + a.dequant)
        else:
            phases.append(4.0 * u * (a.kq + att.n_ctx + a.n_ff + a.n_embd))
    total = max(phases)
    if layers and partial and not att.flash_attn:
        total += 4.0 * u * att.n_ctx  # a second copy of the KQ mask at the host boundary
    return total


def gpu_offload_bytes(host_matrices: Sequence[Matrix], att: Attention, info: ModelInfo) -> float:
    """With a GPU backend, large-batch matrix products of weights kept in RAM run on the first GPU: it
    copies the weight over and holds its output (why `-ngl 0` still takes ~670 MiB of VRAM on an 8B)."""
    best = 0.0
    for m in host_matrices:
        best = max(best, _offload_bytes(m, att.n_ubatch, info))
    return best


def _offload_bytes(m: Matrix, n_ubatch: int, info: ModelInfo) -> float:
    rows = m.rows * (info.n_expert_used or 1) if m.expert else m.rows
    return m.nbytes + 4.0 * n_ubatch * (rows + info.n_embd)


def host_compute_bytes(layout: ModelLayout, att: Attention, layers: Sequence[int], has_output: bool,
                       gpu_backend: bool) -> float:
    """The host's compute buffer. With a GPU backend the host keeps the graph inputs (the KQ mask and the
    token embeddings) plus the activations of the layers it runs; on a CPU-only build it holds the whole
    graph. Calibrated on llama.cpp's own dry runs on this CPU (tests/test_fit_exact.py)."""
    a = activations(layout, att, layers)
    return _host_compute(layout.info, att, a, bool(layers), has_output, gpu_backend)


def _host_compute(info: ModelInfo, att: Attention, a: Activations, layers: bool, has_output: bool,
                  gpu_backend: bool) -> float:
    u = att.n_ubatch
    mask = u * att.n_ctx * (2.0 if att.flash_attn else 4.0)
    if gpu_backend:
        inputs = mask + 8.0 * u * info.n_embd
        if not layers and not has_output:
            return inputs
        return inputs + _cpu_phases(info, att, a, layers, has_output, mask=0.0)
    return _cpu_phases(info, att, a, layers, has_output, mask=mask)


def _cpu_phases(info: ModelInfo, att: Attention, a: Activations, layers: bool, has_output: bool,
                mask: float) -> float:
    u, e = att.n_ubatch, a.n_embd
    # With a quantized V cache and flash attention the CPU graph holds one more activation-sized tensor
    # during the output phase; llama.cpp's dry runs show it from 4096 cells on, not at 2048.
    quantized_fa = att.flash_attn and att.quantized_v
    extra_v = 4.0 * u * e if quantized_fa and att.n_ctx >= QUANTIZED_V_EXTRA_FROM_CTX else 0.0
    phases = [4.0 * u * (info.n_vocab + 2 * e) + extra_v] if has_output else [0.0]
    if layers:
        if att.flash_attn and att.quantized_v:
            phases += [mask + 4.0 * u * (3 * a.ffn + 3 * e), 4.0 * u * (3 * a.ffn + 4 * e)]
        else:
            phases.append(mask + 4.0 * u * (3 * a.ffn + 4 * e))
        if not att.flash_attn:
            phases.append(4.0 * u * (a.kq + att.n_ctx + a.n_ff + 2 * e))
    return max(phases)


def host_overhead_bytes(info: ModelInfo, att: Attention) -> float:
    output_buffer = info.n_vocab * 4.0 * att.n_seq  # logits of the last token of each sequence
    return HOST_BASE_MIB * MIB + info.n_vocab * VOCAB_BYTES_PER_TOKEN + output_buffer


# --- 4. one configuration ----------------------------------------------------------------------------

@dataclass
class DeviceMemory:
    name: str
    weights_mib: float
    kv_mib: float
    compute_mib: float
    overhead_mib: float

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.kv_mib + self.compute_mib + self.overhead_mib

    def to_dict(self) -> dict[str, object]:
        data = {k: _round(v) for k, v in asdict(self).items()}
        data["total_mib"] = _round(self.total_mib)
        return data


@dataclass
class HostMemory(DeviceMemory):
    """RAM. `weights_mib` are the file pages of the tensors kept on the host (memory-mapped). What must
    stay resident is less: repacked matrices live in anonymous memory (`repack_mib`) and their file
    pages become reclaimable cache, and the token embedding is read only a row per token."""

    repack_mib: float = 0.0
    resident_mib: float = 0.0  # what has to stay in RAM while the model runs
    file_read_mib: float = 0.0  # the file pages read once while loading (reclaimable page cache)

    @property
    def total_mib(self) -> float:
        return self.resident_mib


@dataclass
class Breakdown:
    """Memory per device for one configuration; GPUs first, the host last."""

    n_ctx: int
    n_ubatch: int
    gpu_layers: int
    n_layer: int
    kv_type_k: str
    kv_type_v: str
    flash_attn: bool
    n_cpu_moe: int
    gpus: list[DeviceMemory]
    host: HostMemory

    @property
    def devices(self) -> list[DeviceMemory]:
        return [*self.gpus, self.host]

    @property
    def full_offload(self) -> bool:
        return bool(self.gpus) and self.gpu_layers == self.n_layer + 1 and self.n_cpu_moe == 0


def memory_breakdown(model: ModelLayout | GGUFHeader, params: FitParams, gpu_free: Sequence[float] = (),
                     cpu_repack: bool = True) -> Breakdown:
    """MiB per device for one configuration. `gpu_free` lists each GPU's free MiB (it decides the split
    between GPUs); empty means a CPU-only build. `cpu_repack`: the CPU has AVX2 (section 8 of the
    reference: Q4_0/Q4_K/IQ4_NL matrices are copied into a faster layout)."""
    return LayerTable(as_layout(model)).breakdown(params, gpu_free, cpu_repack)


def _block_sums(block: Sequence[Matrix]) -> tuple[int, int, int, int, int | None]:
    """Bytes of a block: all, routed experts, repackable, repackable experts; and the most rows of an
    expert matrix (None without experts). One pass: it runs for every block of every catalog file."""
    total = experts = repack = expert_repack = 0
    expert_rows: int | None = None
    for m in block:
        total += m.nbytes
        if m.repackable:
            repack += m.nbytes
        if m.expert:
            experts += m.nbytes
            expert_repack += m.nbytes if m.repackable else 0
            expert_rows = m.rows if expert_rows is None else max(expert_rows, m.rows)
    return total, experts, repack, expert_repack, expert_rows


def _prefix_sums(values: Iterable[int]) -> list[int]:
    """[0, v0, v0 + v1, ...]: the sum over blocks [a, b) is sums[b] - sums[a]."""
    return list(accumulate(values, initial=0))


@dataclass(frozen=True)
class _AttentionTable:
    """Per-layer figures that depend on the attention settings (context, KV types, flash attention)."""

    kv: list[float]  # kv_layer_bytes
    kq: list[int]  # cells x heads, 0 for layers without K
    dequant: list[float]  # one layer's quantized K/V as f16


@dataclass(frozen=True)
class _OffloadTable:
    """`gpu_offload_bytes` per layer, were its matrices on the host (it depends only on the ubatch)."""

    blocks: list[float]
    experts: list[float]  # the routed experts alone
    output: float


class LayerTable:
    """A layout's figures per layer, worked out once, so that each configuration the planner tries is a
    few sums and maxima over ranges of layers. Every figure is the one the per-layer rules of section 3
    give (tests/test_fit_speed_equivalence.py holds it to them). Blocks on one device are a contiguous
    range (`_spans`), so weight sums come from prefix sums; float sums (KV) are added in layer order,
    exactly as a loop over the layers adds them. A table serves one planning call (`choose`, `plan`):
    it keeps no link to a layout changed after it was built."""

    def __init__(self, layout: ModelLayout) -> None:
        self.layout = layout
        info = self.info = layout.info
        sums = [_block_sums(layout.blocks[il]) for il in range(info.n_layer)]
        self.weights, self.expert_weights, self.repack, self.expert_repack = (
            _prefix_sums([s[i] for s in sums]) for i in range(4))
        self.output_weights = sum(m.nbytes for m in layout.output)
        self.output_repack = sum(m.nbytes for m in layout.output if m.repackable)
        self.ffn = [_ffn_width_of(info, il, s[4]) for il, s in enumerate(sums)]
        self.n_ff = [info.n_ff[il] for il in range(info.n_layer)]
        self.widths = [kv_widths(info, il) for il in range(info.n_layer)]
        # Layers alike for the KV cache (widths, sliding window, recurrent state) get the same figures:
        # each kind is worked out once, on its first layer. Most models have one or two kinds.
        self.kinds = [(w, bool(info.swa_layers and info.swa_layers[il]),  # ((w_k, w_v), swa, recurrent)
                       bool(info.recurrent_layers and info.recurrent_layers[il]))
                      for il, w in enumerate(self.widths)]
        self.first_of_kind = {kind: il for il, kind in reversed(list(enumerate(self.kinds)))}
        self._attention: dict[tuple[object, ...], Attention] = {}
        self._tables: dict[Attention, _AttentionTable] = {}
        self._offload_tables: dict[int, _OffloadTable] = {}

    def attention(self, params: FitParams) -> Attention:
        key = (params.n_ctx, params.n_ubatch, params.n_seq, params.kv_type_k, params.kv_type_v,
               params.flash_attn, params.swa_full)
        if key not in self._attention:
            self._attention[key] = resolve_attention(params, self.info)
        return self._attention[key]

    def for_attention(self, att: Attention) -> _AttentionTable:
        if att not in self._tables:
            self._tables[att] = self._build(att)
        return self._tables[att]

    def _build(self, att: Attention) -> _AttentionTable:
        info = self.info
        widest = 0 if att.flash_attn else max((w_v for _, w_v in self.widths), default=0)
        quantized_k, quantized_v = att.type_k != "f16", att.type_v != "f16"
        cells_of = {kind: kv_cells(info, att, il) for kind, il in self.first_of_kind.items()}
        kv_of = {kind: _kv_layer_bytes(info, att, il, widest) for kind, il in self.first_of_kind.items()}
        dequant_of = {kind: c * (kind[0][0] * quantized_k + kind[0][1] * quantized_v) * 2.0
                      for kind, c in cells_of.items()}
        return _AttentionTable(
            kv=[kv_of[kind] for kind in self.kinds],
            kq=[cells_of[kind] * info.n_head[il] if kind[0][0] else 0 for il, kind in enumerate(self.kinds)],
            dequant=[dequant_of[kind] for kind in self.kinds],
        )

    def offload_table(self, att: Attention) -> _OffloadTable:
        u = att.n_ubatch
        if u not in self._offload_tables:
            per_block = [self._block_offload(self.layout.blocks[il], u) for il in range(self.info.n_layer)]
            self._offload_tables[u] = _OffloadTable([b[0] for b in per_block], [b[1] for b in per_block],
                                                    self._block_offload(self.layout.output, u)[0])
        return self._offload_tables[u]

    def _block_offload(self, block: Sequence[Matrix], n_ubatch: int) -> tuple[float, float]:
        """`gpu_offload_bytes` of the block's matrices and of its routed experts alone (rows > 1 only,
        like the host matrices it is given)."""
        best = best_expert = 0.0
        for m in block:
            if m.rows > 1:
                value = _offload_bytes(m, n_ubatch, self.info)
                best = max(best, value)
                best_expert = max(best_expert, value) if m.expert else best_expert
        return best, best_expert

    def activations(self, t: _AttentionTable, a: int, b: int) -> Activations:
        """`activations` of blocks [a, b)."""
        return Activations(self.info.n_embd, max(self.ffn[a:b], default=0), max(self.n_ff[a:b], default=0),
                           max(t.kq[a:b], default=0), max(t.dequant[a:b], default=0.0))

    def breakdown(self, params: FitParams, gpu_free: Sequence[float], cpu_repack: bool) -> Breakdown:
        info = self.info
        att = self.attention(params)
        ngl = info.n_layer + 1 if params.gpu_layers is None else params.gpu_layers
        n_cpu_moe = info.n_layer if params.cpu_moe else min(params.n_cpu_moe, info.n_layer)
        if not info.is_moe:
            n_cpu_moe = 0
        spans = _spans(info.n_layer, ngl, tuple(gpu_free))
        t = self.for_attention(att)
        gpus = [self._gpu_memory(att, t, spans, g, n_cpu_moe) for g in range(len(gpu_free))]
        host = self._host_memory(att, t, spans, n_cpu_moe, bool(gpu_free), cpu_repack)
        ngl = 0 if not gpu_free else max(0, min(ngl, info.n_layer + 1))
        return Breakdown(att.n_ctx, att.n_ubatch, ngl, info.n_layer, att.type_k, att.type_v, att.flash_attn,
                         n_cpu_moe, gpus, host)

    def _gpu_memory(self, att: Attention, t: _AttentionTable, spans: _Spans, g: int,
                    n_cpu_moe: int) -> DeviceMemory:
        info, layout = self.info, self.layout
        host_end, ranges, output = spans
        a, b = ranges[g]
        moe = min(max(n_cpu_moe, a), b)  # blocks [a, moe) keep their routed experts in RAM
        weights = self.weights[b] - self.weights[a] - (self.expert_weights[moe] - self.expert_weights[a])
        has_output = output == g
        if has_output:
            weights += self.output_weights
            weights += layout.token_embd if info.tied_output else 0  # tied output: a copy of the embedding
        kv = sum(t.kv[a:b])
        partial = b - a != info.n_layer or (n_cpu_moe > 0 and info.n_layer > 0)
        compute = _gpu_compute(info, att, self.activations(t, a, b), b > a, has_output, partial)
        if g == 0:
            compute = max(compute, self._offload(att, host_end, output, n_cpu_moe))
        return DeviceMemory(f"GPU{g}", mib(weights), mib(kv), mib(compute), float(CUDA_CONTEXT_MIB))

    def _offload(self, att: Attention, host_end: int, output: int, n_cpu_moe: int) -> float:
        """`gpu_offload_bytes` of the matrices on the host: all of blocks [0, host_end), the experts of
        the offloaded blocks under n_cpu_moe, the output layer when it stays on the host."""
        moe = min(max(n_cpu_moe, host_end), self.info.n_layer)
        if host_end == 0 and moe == 0 and output >= 0:
            return 0.0  # everything on the GPUs
        t = self.offload_table(att)
        best = max(0.0, max(t.blocks[:host_end], default=0.0), max(t.experts[host_end:moe], default=0.0))
        return max(best, t.output) if output < 0 else best

    def _host_memory(self, att: Attention, t: _AttentionTable, spans: _Spans, n_cpu_moe: int,
                     gpu_backend: bool, cpu_repack: bool) -> HostMemory:
        info, layout = self.info, self.layout
        host_end, _, output = spans
        moe = min(max(n_cpu_moe, host_end), info.n_layer)  # offloaded blocks whose experts stay here
        has_output = output < 0
        weights = self.weights[host_end] + self.expert_weights[moe] - self.expert_weights[host_end]
        repack = self.repack[host_end] + self.expert_repack[moe] - self.expert_repack[host_end]
        if has_output:
            weights += self.output_weights
            repack += self.output_repack
        weights += layout.token_embd + layout.input_other
        repack = repack if cpu_repack else 0
        # The embedding is read a row per token, unless it doubles as the output matrix here.
        sparse = 0 if (info.tied_output and has_output) else layout.token_embd
        kv = sum(t.kv[:host_end])
        a = self.activations(t, 0, host_end)
        compute = _host_compute(info, att, a, host_end > 0, has_output, gpu_backend)
        overhead = host_overhead_bytes(info, att)
        resident = weights - sparse + kv + compute + overhead  # repacked copies replace their file pages
        return HostMemory("host", mib(weights), mib(kv), mib(compute), mib(overhead), repack_mib=mib(repack),
                          resident_mib=mib(resident), file_read_mib=mib(layout.total_bytes))


# (blocks [0, host_end) on the host, (first, end) of the blocks of each GPU, the output layer's device)
_Spans = tuple[int, tuple[tuple[int, int], ...], int]


@lru_cache(maxsize=4096)
def _spans(n_layer: int, gpu_layers: int, gpu_free: tuple[float, ...]) -> _Spans:
    """`place` as ranges of blocks. The host holds a prefix of the blocks and each GPU the next run: the
    offloaded range is cut in order, by a cumulative share that only grows with the layer index."""
    where = place(n_layer, gpu_layers, gpu_free)
    host_end = sum(1 for d in where.blocks if d < 0)
    ranges = []
    for g in range(len(gpu_free)):
        mine = [il for il, d in enumerate(where.blocks) if d == g]
        ranges.append((mine[0], mine[-1] + 1) if mine else (host_end, host_end))
        if mine != list(range(*ranges[-1])):
            raise AssertionError(f"GPU{g}'s blocks are not one run: {mine}")
    return host_end, tuple(ranges), where.output


def _round(value: object) -> object:
    return round(value, 1) if isinstance(value, float) else value


# --- 5. the plan -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """What the planner may use: per GPU, free VRAM minus the CUDA context's share already counted in
    each breakdown and a safety margin; RAM available minus a reserve for the rest of the system."""

    gpu_free: list[float]
    gpu_usable: list[float]
    ram_usable: float
    cpu_repack: bool
    gpus: list[GPUInfo] = field(default_factory=list)
    gpu_overhead: list[float] = field(default_factory=list)  # per GPU: what llama.cpp uses beyond buffers

    def fits(self, bd: Breakdown) -> bool:
        if bd.gpus and len(bd.gpus) != len(self.gpu_usable):
            return False
        gpus_ok = all(d.total_mib <= cap for d, cap in zip(bd.gpus, self.gpu_usable, strict=False))
        return gpus_ok and bd.host.total_mib <= self.ram_usable


def budget_for(report: HardwareReport, extra_host_mib: float = 0.0) -> Budget:
    gpus = report.usable_gpus
    usable = [g.free_mib - device_margin_mib(g) for g in gpus]
    ram_margin = max(RAM_MARGIN_MIN_MIB, RAM_MARGIN_FRACTION * report.ram_total_mib)
    ram_usable = report.ram_available_mib - ram_margin - extra_host_mib
    return Budget([float(g.free_mib) for g in gpus], usable, ram_usable,
                  report.cpu.avx2, list(gpus), [gpu_overhead_mib(g) for g in gpus])


def device_margin_mib(gpu: GPUInfo) -> float:
    """What a device keeps free: a GPU a safety margin of its VRAM; a worker lending its CPU the reserve
    RAM needs (its system and programs live there too)."""
    if gpu.kind == "cpu":
        return max(RAM_MARGIN_MIN_MIB, RAM_MARGIN_FRACTION * gpu.total_mib)
    return max(GPU_MARGIN_MIN_MIB, GPU_MARGIN_FRACTION * gpu.total_mib)


def gpu_overhead_mib(gpu: GPUInfo) -> float:
    """Memory llama.cpp takes on a GPU beyond the buffers it logs: what an earlier load on this GPU and
    driver measured, else the CUDA context measured on an H100. An RPC device's server holds its own
    context on its own machine; a CPU server has none."""
    if gpu.overhead_mib is not None:
        return gpu.overhead_mib
    return 0.0 if gpu.rpc_endpoint else float(CUDA_CONTEXT_MIB)


@dataclass
class Plan:
    verdict: Verdict
    reason: str
    breakdown: Breakdown
    max_ctx_full_gpu: int | None
    max_ctx: int | None
    n_ctx_requested: int
    model: str
    budget: Budget
    mode: str = "analytic"
    notes: list[str] = field(default_factory=list)

    def placement(self) -> DevicePlacement:
        """The devices and layers per device this plan chose, as the engine hands them to llama.cpp."""
        bd = self.breakdown
        if not bd.gpus or bd.gpu_layers == 0:
            return DevicePlacement()
        free = tuple(self.budget.gpu_free)
        _, ranges, output = _spans(bd.n_layer, bd.gpu_layers, free)
        counts = [(b - a) + (1 if output == g else 0) for g, (a, b) in enumerate(ranges)]
        names = [device_name(gpu, g) for g, gpu in enumerate(self.budget.gpus)]
        used = [(n, c) for n, c in zip(names, counts, strict=True) if c]
        rpc = list(dict.fromkeys(gpu.rpc_endpoint for gpu in self.budget.gpus if gpu.rpc_endpoint))
        return DevicePlacement(devices=[n for n, _ in used], layers=[c for _, c in used],
                               n_cpu_moe=bd.n_cpu_moe, rpc_servers=rpc)

    def to_dict(self) -> dict[str, object]:
        bd = self.breakdown
        devices = [d.to_dict() for d in bd.devices]
        for g, (d, free) in enumerate(zip(devices[:-1], self.budget.gpu_free, strict=False)):
            d["free_mib"] = _round(free)
            if g < len(self.budget.gpus):
                d["device"] = device_name(self.budget.gpus[g], g)
                d["label"] = self.budget.gpus[g].name
        devices[-1]["device"] = "CPU"
        devices[-1]["available_mib"] = _round(self.budget.ram_usable)
        return {
            "model": self.model, "mode": self.mode, "verdict": self.verdict, "reason": self.reason,
            "n_ctx": bd.n_ctx, "n_ctx_requested": self.n_ctx_requested, "n_ubatch": bd.n_ubatch,
            "gpu_layers": bd.gpu_layers, "n_layer": bd.n_layer, "n_cpu_moe": bd.n_cpu_moe,
            "kv_type": bd.kv_type_k if bd.kv_type_k == bd.kv_type_v else f"{bd.kv_type_k}/{bd.kv_type_v}",
            "kv_type_k": bd.kv_type_k, "kv_type_v": bd.kv_type_v, "flash_attn": bd.flash_attn,
            "max_ctx_full_gpu": self.max_ctx_full_gpu, "max_ctx": self.max_ctx,
            "devices": devices, "notes": self.notes,
        }


def device_name(gpu: GPUInfo, position: int) -> str:
    """llama.cpp's name for a GPU of the budget; NVML's n-th GPU is CUDA's n-th unless known better."""
    return gpu.device or f"CUDA{gpu.index if not gpu.synthetic else position}"


def plan(model: ModelLayout | GGUFHeader, report: HardwareReport, params: FitParams = FitParams()) -> Plan:
    """The best way to run the model on this machine: the most work on the GPU(s) that fits, with the
    verdict and a reason a person understands, and the largest contexts that would fit."""
    layout = as_layout(model)
    info = layout.info
    params = replace(params, n_ctx=params.n_ctx or default_ctx(info))
    resolve_attention(params, info)  # bad settings fail here, with their own message
    budget = budget_for(report, params.extra_host_mib)
    table = LayerTable(layout)  # shared by every configuration tried below
    verdict, bd = _choose(table, params, budget)
    limit = max(info.n_ctx_train, params.n_ctx or 0)
    fixed = replace(params, kv_type_k=bd.kv_type_k, kv_type_v=bd.kv_type_v)
    max_full = None
    if budget.gpus:
        max_full = _max_ctx(limit, lambda c: _fits_full(table, replace(fixed, n_ctx=c), budget))
    max_any = _max_ctx(limit, lambda c: _choose(table, replace(params, n_ctx=c), budget)[0] != "wont_fit")
    name = info.name or layout.info.architecture
    result = Plan(verdict, "", bd, max_full, max_any, params.n_ctx or 0, name, budget)
    result.reason = explain(result)
    return result


def choose(layout: ModelLayout, params: FitParams, budget: Budget) -> tuple[Verdict, Breakdown]:
    """Settings the user fixed (GPU layers, experts in RAM) are kept: they fit or they don't. Otherwise
    try, in order: everything on the GPU(s) (f16 KV, then q8_0 with flash attention when the user left
    the KV type open); for MoE, all layers on the GPU with the fewest experts in RAM; the most GPU
    layers; the CPU alone (with the GPU hidden from llama.cpp)."""
    return _choose(LayerTable(layout), params, budget)


def _choose(table: LayerTable, params: FitParams, budget: Budget) -> tuple[Verdict, Breakdown]:
    if budget.gpus and (params.gpu_layers is not None or params.cpu_moe or params.n_cpu_moe):
        bd = _breakdown(table, params, budget)
        return (_verdict_of(bd) if budget.fits(bd) else "wont_fit"), bd
    if budget.gpus:
        found = _choose_gpu(table, params, budget)
        if found:
            return found
    cpu = table.breakdown(replace(params, gpu_layers=0), (), budget.cpu_repack)
    return ("cpu_only" if budget.fits(cpu) else "wont_fit"), cpu


def _verdict_of(bd: Breakdown) -> Verdict:
    if bd.full_offload:
        return "full_gpu"
    return "partial_gpu" if bd.gpu_layers or bd.n_cpu_moe else "cpu_only"


def _choose_gpu(table: LayerTable, params: FitParams, budget: Budget) -> tuple[Verdict, Breakdown] | None:
    n_layer = table.info.n_layer
    for kv_k, kv_v in _kv_choices(params):
        full = _breakdown(table, replace(params, kv_type_k=kv_k, kv_type_v=kv_v), budget)
        if budget.fits(full):
            return "full_gpu", full
    kv_k = params.kv_type_k or "f16"
    base = replace(params, kv_type_k=kv_k, kv_type_v=params.kv_type_v or kv_k)
    if table.info.is_moe:
        n = _least(0, n_layer, lambda k: budget.fits(_breakdown(table, replace(base, n_cpu_moe=k), budget)))
        if n is not None:
            return "partial_gpu", _breakdown(table, replace(base, n_cpu_moe=n), budget)
    ngl = _most(1, n_layer, lambda k: budget.fits(_breakdown(table, replace(base, gpu_layers=k), budget)))
    if ngl is None:
        return None
    return "partial_gpu", _breakdown(table, replace(base, gpu_layers=ngl), budget)


def _kv_choices(params: FitParams) -> list[tuple[str, str]]:
    """(K, V) cache types to try: the user's, or f16 then q8_0 (which needs flash attention)."""
    if params.kv_type_k or params.kv_type_v:
        kv_k = params.kv_type_k or "f16"
        return [(kv_k, params.kv_type_v or kv_k)]
    return [("f16", "f16")] if params.flash_attn == "off" else [("f16", "f16"), ("q8_0", "q8_0")]


def _breakdown(table: LayerTable, params: FitParams, budget: Budget) -> Breakdown:
    bd = table.breakdown(params, budget.gpu_free, budget.cpu_repack)
    for device, overhead in zip(bd.gpus, budget.gpu_overhead, strict=False):
        device.overhead_mib = overhead
    return bd


def _fits_full(table: LayerTable, params: FitParams, budget: Budget) -> bool:
    everything = replace(params, gpu_layers=None, cpu_moe=False, n_cpu_moe=0)
    return budget.fits(_breakdown(table, everything, budget))


def _most(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The largest k in [lo, hi] with ok(k), for ok true below some point and false above it."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _least(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The smallest k in [lo, hi] with ok(k), for ok false below some point and true above it."""
    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def _max_ctx(limit: int, ok: Callable[[int], bool]) -> int | None:
    """The largest context (a multiple of 256, at most `limit`) for which ok holds."""
    best = _most(1, max(1, limit // CTX_PAD), lambda k: ok(k * CTX_PAD))
    return None if best is None else best * CTX_PAD


# --- the reason, in words ----------------------------------------------------------------------------

def explain(p: Plan) -> str:
    bd, budget = p.breakdown, p.budget
    ctx = f"{bd.n_ctx} tokens of context"
    kv_note = f", with the KV cache in {bd.kv_type_k} (flash attention on)" if bd.kv_type_k != "f16" else ""
    ram = f"{gb(round(bd.host.total_mib))} of RAM"
    if p.verdict == "full_gpu":
        spare = min(f - d.total_mib for f, d in zip(budget.gpu_free, bd.gpus, strict=True))
        return f"fits fully on your {_gpu_names(budget.gpus)} at {ctx}{kv_note}, {gb(round(spare))} to spare"
    if p.verdict == "partial_gpu":
        where = _partial_where(bd)
        return (f"runs partly on your {_gpu_names(budget.gpus)}: {where}; {ctx}{kv_note}; "
                f"needs {ram} (slower than fully on the GPU)")
    if p.verdict == "cpu_only":
        why = "the GPU cannot hold even one layer" if budget.gpus else "no usable GPU"
        if bd.gpus:
            why = f"0 GPU layers; the GPU still holds {gb(round(bd.gpus[0].total_mib))} of buffers"
        return f"runs on the CPU only ({why}): needs {ram} of {gb(round(budget.ram_usable))} usable at {ctx}"
    return _wont_fit_reason(p, ctx)


def _gpu_names(gpus: Sequence[GPUInfo]) -> str:
    names = [f"{short_gpu_name(g.name)} ({gb(g.total_mib)})" for g in gpus]
    return names[0] if len(names) == 1 else f"{len(names)} GPUs ({' + '.join(names)})"


def _partial_where(bd: Breakdown) -> str:
    if bd.n_cpu_moe:
        return (f"all {bd.n_layer} layers on the GPU with the experts of {bd.n_cpu_moe} of them "
                "in RAM (mixture of experts)")
    return f"{bd.gpu_layers} of {bd.n_layer + 1} layers on the GPU, the rest on the CPU"


def _wont_fit_reason(p: Plan, ctx: str) -> str:
    caps = [*p.budget.gpu_usable, p.budget.ram_usable]
    over = [(d, d.total_mib - cap) for d, cap in zip(p.breakdown.devices, caps[-len(p.breakdown.devices):],
                                                       strict=True) if d.total_mib > cap]
    if over and over[0][0].name != "host":
        dev, excess = over[0]
        text = (f"does not fit: with {p.breakdown.gpu_layers} layers on the GPU, {dev.name} would need "
                f"{gb(round(dev.total_mib))} at {ctx}, {gb(round(excess))} more than it can give")
    else:
        need = gb(round(p.breakdown.host.total_mib))
        have = gb(max(0, round(p.budget.ram_usable)))
        text = f"does not fit: at {ctx} it needs {need} of RAM and only {have} is usable"
    if p.max_ctx:
        return f"{text}; the largest context that runs is {p.max_ctx} tokens"
    return f"{text}, even at the smallest context"
