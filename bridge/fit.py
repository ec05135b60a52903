"""The memory planner: how much memory a GGUF model needs on each device, and where it should run.

Pure functions over the GGUF tensor table, `ModelInfo`, a `HardwareReport` and the run settings. It
replicates llama.cpp's allocation rules: weights placement, KV cache sizes, and the compute buffers, by
replaying llama.cpp's graph allocator and backend scheduler over the tensors of its transformer block
(checked against llama.cpp's own plans in tests/test_fit_calibration*.py and its dry runs on this CPU in
tests/test_fit_exact.py). Nothing is loaded and no GPU is needed.

Layout of this module, top to bottom:
  1. settings (`FitParams`) and the model's per-layer byte table (`ModelLayout`);
  2. placement: which device holds each layer (llama.cpp's `-ngl` and multi-GPU split rules);
  3. the KV cache, the compute buffers and the fixed overheads;
  4. `memory_breakdown`: MiB per device for one configuration, worked out by `LayerTable` from per-layer
     figures computed once per model, so the searches of section 5 stay cheap over a whole catalog;
  5. `plan`: the search over GPU layers, KV type and context, and the verdict with its reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from itertools import accumulate, pairwise
from typing import Any

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


# --- compute buffers -------------------------------------------------------------------------------------
#
# llama.cpp sizes each backend's compute buffer by reserving the worst-case graph, one full ubatch against
# the whole cache (llama-context.cpp, sched_reserve), through ggml_backend_sched (ggml-backend.cpp). The
# scheduler runs an op on the backend that holds its weights, except that a GPU takes over ops whose weights
# are in RAM once the batch is large enough (`offload_op`), copying the weight in at the start of a split of
# its own; a tensor used on another backend is copied there at the start of the split that needs it. The
# graph allocator (ggml-alloc.c) gives a tensor its place when the op that makes it runs: the smallest free
# block below the top that holds it, else the top; element-wise ops take over their input's memory; a
# tensor is freed after its last consumer. A buffer is the allocator's high-water mark, holes included. The
# planner replays that allocator over the tensors of the graph llama.cpp builds for a transformer block
# (src/models/llama.cpp, llama-graph.cpp), in graph order, once per backend.

OFFLOAD_MIN_BATCH = 32  # ggml-cuda offload_op: a GPU takes over ops of weights in RAM from this batch on
PIPELINE_COPIES = 4  # GGML_SCHED_MAX_COPIES: input copies kept with pipeline parallelism (several GPUs)
CUDA_ROW_PADDING = 512  # MATRIX_ROW_PADDING: a quantized tensor's CUDA buffer pads its rows to this
GPU_ALIGN, HOST_ALIGN = 128, 32  # tensor alignment in a CUDA buffer and in (pinned) host memory
RUN_HEAD = 2  # blocks of a run replayed before looking for the allocator's cycle (period 1 or 2)

# How a block runs on a backend. On a GPU: NATIVE (its weights and cache are there), COPIED (weights and
# cache in RAM, the first GPU runs it anyway: each weight and both cache views are copied in), EXPERTS
# (native, the routed experts copied in from RAM), EXPERTS_AWAY (native, its experts stay in RAM and the CPU
# runs them: small batches), EXPERTS_GPU0 (native, its experts in RAM run on the first GPU). On the host:
# NATIVE (the CPU runs it), STORE (a COPIED block's K and V come back to be stored in the cache),
# REMOTE_EXPERTS (the experts of an EXPERTS_AWAY block); on the first GPU, those of EXPERTS_GPU0 blocks.
NATIVE, COPIED, EXPERTS, EXPERTS_AWAY, EXPERTS_GPU0, STORE, REMOTE_EXPERTS = range(7)
INPUT_NAMES = ("pos", "k_rot", "v_rot", "k_idxs", "v_idxs", "mask", "out_ids")


@dataclass(frozen=True)
class BlockGraph:
    """Bytes of the tensors one block's graph allocates for one ubatch, and of the weights a GPU copies in
    when the block's weights stay in RAM. For a run of blocks: the largest of each."""

    x: float = 0.0  # the residual stream and every n_embd-wide activation
    q: float = 0.0  # Q, projected and then RoPE'd (RoPE of a reshaped view cannot run in place)
    o: float = 0.0  # the attention output before its projection
    k: float = 0.0
    v: float = 0.0
    scores: float = 0.0  # without flash attention: KQ, cells x heads per token (softmax runs in place)
    fa_f16: float = 0.0  # CUDA flash attention: quantized K/V converted to f16 inside the op's buffer
    k_view: float = 0.0  # the block's K cache as attention reads it (copied to a GPU from RAM)
    v_view: float = 0.0
    ffn: float = 0.0  # gate, up and their product: n_ff, or n_expert_used x expert width
    down: float = 0.0  # FFN output: x, or one per chosen expert
    router: float = 0.0  # MoE: expert logits, and the experts sorted by them
    route: float = 0.0  # MoE: the chosen experts' weights
    shared: float = 0.0  # MoE: the shared experts' gate, up and their product (a dense FFN beside them)
    rot_k: bool = False  # quantized K: Q and K are rotated (Hadamard) before attention
    rot_v: bool = False  # quantized V: V, and the attention output back
    w_q: float = 0.0
    w_k: float = 0.0
    w_v: float = 0.0
    w_o: float = 0.0
    w_ffn: float = 0.0  # gate or up
    w_down: float = 0.0
    w_router: float = 0.0
    w_experts: float = 0.0  # one stacked expert tensor (gate, up or down)

    def merge(self, other: BlockGraph) -> BlockGraph:
        if other is self:
            return self
        return BlockGraph(*map(max, vars(self).values(), vars(other).values()))


@dataclass(frozen=True)
class GraphInputs:
    """Bytes of the graph's inputs (llama-graph.cpp): token ids, the embeddings input (allocated though a
    text batch leaves it unused), positions, rotations, KV slots, KQ mask(s), the rows to output."""

    tokens: float
    embd: float
    pos: float
    k_rot: float
    v_rot: float
    k_idxs: float
    v_idxs: float
    mask: float
    out_ids: float

    def sizes(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in INPUT_NAMES}


@dataclass(frozen=True)
class _BlockShape:
    """The part of a block's graph the run settings do not change."""

    ffn: int  # FFN activation width
    moe: bool
    weights: tuple[float, ...]  # bytes of the weights BlockGraph lists, w_q to w_experts


def block_graph(layout: ModelLayout, att: Attention, il: int) -> BlockGraph:
    return _graph(layout.info, att, il, _block_shape(layout, il))


def _graph(info: ModelInfo, att: Attention, il: int, shape: _BlockShape) -> BlockGraph:
    u = 4.0 * att.n_ubatch  # bytes of one f32 element per token
    w_k, w_v = kv_widths(info, il)
    heads = info.n_head[il] if w_k else 0
    cells = kv_cells(info, att, il)
    quantized_k, quantized_v = att.type_k != "f16", att.type_v != "f16"
    used = info.n_expert_used if shape.moe else 1
    return BlockGraph(
        u * info.n_embd, u * heads * info.head_dim_k, u * heads * info.head_dim_v, u * w_k, u * w_v,
        0.0 if att.flash_attn else u * cells * heads,
        2.0 * cells * (w_k * quantized_k + w_v * quantized_v) if att.flash_attn else 0.0,
        _view_bytes(att.type_k, cells, w_k, info.head_dim_k),
        _view_bytes(att.type_v, cells, w_v, info.head_dim_v),
        u * shape.ffn, u * info.n_embd * used, u * info.n_expert if shape.moe else 0.0,
        u * used if shape.moe else 0.0, u * info.n_ff_expert * info.n_expert_shared if shape.moe else 0.0,
        bool(w_k) and quantized_k and info.head_dim_k % 64 == 0,
        bool(w_v) and quantized_v and info.head_dim_v % 64 == 0, *shape.weights)


def _view_bytes(kv_type: str, cells: int, width: int, head_dim: int) -> float:
    """One layer's K or V cache as a GPU's copy of it: CUDA pads a quantized row to 512 elements."""
    pad = row_bytes(kv_type, -head_dim % CUDA_ROW_PADDING) if kv_type != "f16" and width else 0.0
    return cells * row_bytes(kv_type, width) + pad


def _block_shape(layout: ModelLayout, il: int) -> _BlockShape:
    """The FFN width of block il, whether it routes to experts, and the bytes of each weight it multiplies
    by, for the copies a GPU makes of weights in RAM. A byte table need not name its matrices, so each gets
    its group's bytes in proportion to its elements: the dense matrices (attention, FFN, shared experts),
    the stacked experts (gate, up, down), the router."""
    info = layout.info
    block = layout.blocks[il]
    expert_rows = [m.rows for m in block if m.expert]
    moe = bool(expert_rows and info.n_expert_used)
    if moe:
        hidden = [r for r in expert_rows if r != info.n_embd] or expert_rows  # gate/up, not down
        ffn = info.n_expert_used * (info.n_ff_expert or max(hidden))
    else:  # without an FFN (e.g. Mamba): its widest projection
        ffn = info.n_ff[il] or max((m.rows for m in block), default=0)
    router = sum(m.nbytes for m in block if moe and not m.expert and m.rows == info.n_expert)
    dense = sum(m.nbytes for m in block if not m.expert and m.rows > 1) - router
    e, heads, heads_kv = info.n_embd, info.n_head[il], info.n_head_kv[il]
    q, o = e * heads * info.head_dim_k, e * heads * info.head_dim_v
    k, v = e * heads_kv * info.head_dim_k, e * heads_kv * info.head_dim_v
    f = e * (info.n_ff_expert * info.n_expert_shared if moe else info.n_ff[il])
    per = dense / ((q + k + v + o + 3 * f) or 1)
    experts = sum(m.nbytes for m in block if m.expert) / 3
    weights = (q * per, k * per, v * per, o * per, f * per, f * per, float(router), experts)
    return _BlockShape(ffn, moe, weights)


def graph_inputs(info: ModelInfo, att: Attention) -> GraphInputs:
    """One KQ mask and one pair of KV slot lists per cache (two with sliding-window layers); without flash
    attention the mask is f32 and V, stored transposed, gets a slot per element."""
    u = att.n_ubatch
    caches = {bool(info.swa_layers and info.swa_layers[il]): il for il in range(info.n_layer)
              if kv_widths(info, il)[0]}
    mask = sum(u * kv_cells(info, att, il) * (2.0 if att.flash_attn else 4.0) for il in caches.values())
    slots = 8.0 * u * max(len(caches), 1)
    v_slots = 1 if att.flash_attn else max(_widest_v(info), 1)
    rot_k = att.type_k != "f16" and info.head_dim_k % 64 == 0
    rot_v = att.type_v != "f16" and info.head_dim_v % 64 == 0
    return GraphInputs(4.0 * u, 4.0 * u * info.n_embd, 4.0 * u, 4.0 * _rotation(info.head_dim_k) ** 2 * rot_k,
                       4.0 * 64 * 64 * rot_v, slots, slots * v_slots, mask, 4.0 * u)


def _rotation(head_dim: int) -> int:
    """Side of the Hadamard matrix that rotates K: the largest power of two from 64 on dividing it."""
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


def output_bytes(layout: ModelLayout, att: Attention) -> tuple[float, float]:
    """The logits (f32, every row of the ubatch output in the worst case) and the output weight a GPU
    copies in when the output layer stays in RAM (the token embedding when the output is tied to it)."""
    weight = sum(m.nbytes for m in layout.output if m.rows > 1)
    return 4.0 * att.n_ubatch * layout.info.n_vocab, float(weight or layout.token_embd)


# --- the tensors of a block, as events

Event = tuple  # ("a", key, bytes) made | ("f", key) freed | ("r", key, new) renamed: an op ran in place
#                | ("s",) a split starts | ("i", key, bytes) its input | ("n", input) a graph input used
#                | ("u", input) used, for the last time if no later "u" | ("L", run) | ("R", run, n, events)
Run = tuple[int, int, BlockGraph]  # (how the blocks run, how many in a row, their graph)


@lru_cache(maxsize=2048)
def _block_events(b: BlockGraph, how: int, last: bool, gpu: bool) -> tuple[Event, ...]:
    """One block's tensors in llama.cpp's graph order: when each is made and when its last consumer has run.
    RMS norms' weights, residual adds and the softmax run in place. The last block keeps only the rows
    that are output (all of them, in the worst case) of the attention output and of the residual."""
    copied = how == COPIED
    ev: list[Event] = [("a", "n", b.x)]
    _matmul(ev, "Qm", b.q, b.w_q if copied else 0.0)
    ev += [("n", "pos"), ("a", "Q", b.q), ("f", "Qm")]
    if b.rot_k:
        ev += [("n", "k_rot"), ("a", "Qh", b.q), ("f", "Q"), ("r", "Qh", "Q")]
    _matmul(ev, "V", b.v, b.w_v if copied else 0.0)
    if b.rot_v:
        ev += [("n", "v_rot"), ("a", "Vh", b.v), ("f", "V"), ("r", "Vh", "V")]
    _matmul(ev, "Km", b.k, b.w_k if copied else 0.0)
    ev += [("f", "n"), ("a", "K", b.k), ("f", "Km"), ("u", "pos")]
    if b.rot_k:
        ev += [("a", "Kh", b.k), ("u", "k_rot"), ("f", "K"), ("r", "Kh", "K")]
    if copied:  # K and V go to the cache in RAM; the GPU then reads the layer's whole cache in
        ev += [("f", "K"), ("f", "V"), ("s",), ("i", "Kc", b.k_view)]
    else:
        ev += [("n", "k_idxs"), ("n", "v_idxs"), ("f", "K"), ("f", "V"), ("u", "k_idxs"), ("u", "v_idxs")]
    _attention(ev, b, copied, gpu)
    if copied:
        ev += [("s",), ("i", "Wo", b.w_o)]
    if last:
        ev.append(("n", "out_ids"))
    ev += [("a", "A", b.x), ("f", "Wo"), ("f", "O")]
    if last:
        ev += [("a", "A2", b.x), ("f", "A"), ("a", "X2", b.x), ("f", "x"), ("u", "out_ids"), ("f", "X2"),
               ("r", "A2", "A")]
    else:
        ev.append(("f", "x"))
    ev.append(("a", "n", b.x))
    _ffn(ev, b, how)
    return tuple(ev)


def _matmul(ev: list[Event], key: str, size: float, weight: float) -> None:
    """A matrix product; a weight in RAM makes it a split of its own that copies the weight in."""
    if weight:
        ev += [("s",), ("i", "W", weight), ("a", key, size), ("f", "W")]
    else:
        ev.append(("a", key, size))


def _attention(ev: list[Event], b: BlockGraph, copied: bool, gpu: bool) -> None:
    if b.scores:  # KQ (softmax in place), KQV, its permuted copy
        ev += [("n", "mask"), ("i", "Vc", b.v_view)] if copied else [("n", "mask")]
        ev += [("a", "S", b.scores), ("f", "Kc"), ("f", "Q"), ("u", "mask"), ("a", "P", b.o), ("f", "Vc"),
               ("f", "S"), ("a", "O", b.o), ("f", "P")]
    else:
        ev += [("i", "Vc", b.v_view), ("n", "mask")] if copied else [("n", "mask")]
        ev += [("a", "O", b.o + (b.fa_f16 if gpu else 0.0)), ("f", "Q"), ("f", "Kc"), ("f", "Vc"),
               ("u", "mask")]
    if b.rot_v:
        ev += [("a", "Oh", b.o), ("u", "v_rot"), ("f", "O"), ("r", "Oh", "O")]


def _ffn(ev: list[Event], b: BlockGraph, how: int) -> None:
    experts = b.router > 0 and how in (COPIED, EXPERTS)
    gate_up = b.w_experts if experts else b.w_ffn if how == COPIED else 0.0
    down = b.w_experts if experts else b.w_down if how == COPIED else 0.0
    if b.router:  # logits (softmax in place), the chosen experts, their weights, normalised
        _matmul(ev, "Rl", b.router, b.w_router if how == COPIED else 0.0)
        ev += [("a", "Rs", b.router), ("a", "Rw", b.route), ("f", "Rl"), ("a", "Ra", b.route * b.x / b.down),
               ("a", "Rn", b.route), ("f", "Rw"), ("f", "Ra")]
    if how == EXPERTS_AWAY:  # the CPU runs the experts: their outputs come back
        ev += [("f", "n"), ("a", "D", b.down), ("f", "Rs"), ("f", "Rn"), ("a", "M", b.x), ("f", "D"),
               ("r", "M", "x"), ("f", "A")]
        return
    if how == EXPERTS_GPU0:  # the first GPU runs the experts and the residual add: the result comes back
        ev += [("f", "n"), ("f", "Rs"), ("f", "Rn"), ("f", "A"), ("a", "x", b.x)]
        return
    _matmul(ev, "G", b.ffn, gate_up)
    _matmul(ev, "U", b.ffn, gate_up)
    ev += [("a", "S", b.ffn)] if b.shared else [("f", "n"), ("a", "S", b.ffn)]
    ev += [("f", "G"), ("f", "U")]
    _matmul(ev, "D", b.down, down)
    ev.append(("f", "S"))
    if b.router:  # weighted in place, summed over the chosen experts into a new tensor
        ev += [("f", "Rs"), ("f", "Rn"), ("a", "M", b.x), ("f", "D")]
        if b.shared:  # then the shared experts, a dense FFN on the same input, added in place
            weight = b.w_ffn if how == COPIED else 0.0
            _matmul(ev, "G", b.shared, weight)
            _matmul(ev, "U", b.shared, weight)
            ev += [("f", "n"), ("a", "S", b.shared), ("f", "G"), ("f", "U")]
            _matmul(ev, "D", b.x, b.w_down if how == COPIED else 0.0)
            ev += [("f", "S"), ("f", "D")]
        ev.append(("r", "M", "x"))
    else:
        ev.append(("r", "D", "x"))  # the residual add runs in place
    ev.append(("f", "A"))


@lru_cache(maxsize=256)
def _remote_expert_events(b: BlockGraph, gpu: bool) -> tuple[Event, ...]:
    """The experts of a block whose other ops run on another backend. Its normed input and chosen experts
    come in; on the first GPU (op offload) each expert weight is copied in and the experts' weighted sum
    and the residual add run there too, the result going back; on the CPU the experts' outputs go back."""
    w = b.w_experts if gpu else 0.0
    ev: list[Event] = [("s",), ("i", "W", w), ("i", "n", b.x), ("i", "Rs", b.route), ("a", "G", b.ffn),
                       ("f", "W")]
    _matmul(ev, "U", b.ffn, w)
    ev += [("f", "n"), ("a", "S", b.ffn), ("f", "G"), ("f", "U")]
    if gpu:
        ev += [("s",), ("i", "W", w), ("i", "Rn", b.route), ("i", "A", b.x), ("a", "D", b.down), ("f", "W"),
               ("f", "S"), ("f", "Rs"), ("f", "Rn"), ("a", "M", b.x), ("f", "D"), ("f", "A"), ("f", "M")]
    else:
        ev += [("a", "D", b.down), ("f", "S"), ("f", "Rs"), ("f", "D")]
    return tuple(_resolve(ev, {}))


# --- the allocator

class _Arena:
    """ggml-alloc's dynamic allocator (ggml_dyn_tallocr): a tensor takes the smallest free block below the
    top that holds it (the later one of equals), else the top; a freed block merges with its free
    neighbours. `peak` is the buffer size it needs."""

    def __init__(self, align: int) -> None:
        self.align = align
        self.blocks: list[list[float]] = [[0.0, float("inf")]]  # free [offset, size], by offset
        self.at: dict[str, tuple[float, float]] = {}
        self.peak = 0.0

    def play(self, events: Iterable[Event]) -> None:
        """Make, free and rename tensors. One loop with everything inlined: the planner replays a few
        hundred events for each configuration it tries."""
        blocks, at, align, peak = self.blocks, self.at, self.align, self.peak
        for e in events:
            kind = e[0]
            if kind == "a":
                size = e[2]
                if size <= 0:
                    continue
                size = -(-size // align) * align
                best, best_size = len(blocks) - 1, float("inf")
                for i in range(best):
                    if size <= blocks[i][1] <= best_size:
                        best, best_size = i, blocks[i][1]
                block = blocks[best]
                offset = block[0]
                block[0] += size
                block[1] -= size
                if block[1] == 0:
                    del blocks[best]
                at[e[1]] = (offset, size)
                if offset + size > peak:
                    peak = offset + size
            elif kind == "f":
                if e[1] in at:
                    _release(blocks, *at.pop(e[1]))
            elif kind == "r" and e[1] in at:
                at[e[2]] = at.pop(e[1])
        self.peak = peak

    def state(self) -> tuple[object, ...]:
        return tuple(map(tuple, self.blocks)), tuple(sorted(self.at.items()))


def _release(blocks: list[list[float]], offset: float, size: float) -> None:
    """Return [offset, offset + size) to the free blocks, merged with its free neighbours."""
    for i, block in enumerate(blocks):
        if block[0] + block[1] == offset:
            block[1] += size
            if i + 1 < len(blocks) and block[0] + block[1] == blocks[i + 1][0]:
                block[1] += blocks.pop(i + 1)[1]
            return
        if offset + size == block[0]:
            block[0], block[1] = offset, block[1] + size
            if i > 0 and blocks[i - 1][0] + blocks[i - 1][1] == offset:
                blocks[i - 1][1] += blocks.pop(i)[1]
            return
    blocks.insert(next((i for i, b in enumerate(blocks) if b[0] > offset), len(blocks)), [offset, size])


def _resolve(events: Sequence[Event], sizes: dict[str, float], held: Iterable[str] = (),
             keep: Iterable[str] = ()) -> list[Event]:
    """Place split inputs: a split's inputs (weight and cache copies, graph inputs not yet on this backend)
    are allocated together when it starts, in the order its ops meet them (ggml-backend.cpp: the split
    pass and the graph copy); a graph input is freed after its last use, unless kept."""
    last = {e[1]: i for i, e in enumerate(events) if e[0] == "u"}
    held, keep = set(held), set(keep)
    out: list[Event] = []
    start = 0
    for i, e in enumerate(events):
        kind = e[0]
        if kind == "s":
            start = len(out)
        elif kind == "i" or (kind == "n" and e[1] not in held):
            held.add(e[1])
            out.insert(start, ("a", e[1], e[2] if kind == "i" else sizes[e[1]]))
            start += 1
        elif kind == "u":
            if last[e[1]] == i and e[1] not in keep:
                out.append(("f", e[1]))
        elif kind != "n":
            out.append(e)
    return out


def _replay(events: Sequence[Event], align: int) -> float:
    """The allocator's peak over a backend's events. A run's middle blocks ("R") repeat the same tensors,
    and the allocator soon cycles through the same layouts: once the layout at a block's start recurs,
    whole cycles change nothing and are skipped, so a long run costs a few blocks."""
    arena = _Arena(align)
    seen: list[tuple[object, ...]] = []
    run = None
    start = 0
    for i, e in enumerate(events):
        if e[0] in "LR":
            arena.play(events[start:i])
            start = i + 1
            if e[0] == "L":
                if e[1] != run:
                    run, seen = e[1], []
                seen.append(arena.state())
                continue
            left = e[2]
            while left:  # play middle blocks until a layout recurs, then only what is left of a cycle
                now = arena.state()
                period = next((p for p in range(1, len(seen) + 1) if seen[-p] == now), 0)
                if period:
                    left %= period
                    break
                seen.append(now)
                arena.play(e[3])
                left -= 1
            for _ in range(left):
                arena.play(e[3])
    arena.play(events[start:])
    return arena.peak


@lru_cache(maxsize=2048)
def _middle_block(b: BlockGraph, how: int, gpu: bool) -> tuple[Event, ...]:
    """A block amid its run: every graph input already in place, none used for the last time."""
    return tuple(_resolve(_block_events(b, how, False, gpu), {}, INPUT_NAMES, INPUT_NAMES))


def _runs_events(runs: Sequence[Run], ends_model: bool, gpu: bool, norm_in: bool = False,
                 norm_out: bool = False) -> list[Event]:
    """A backend's runs: the first and last blocks of each, a repeat marker for those between.
    `norm_in`: the first block's input norm ran on the previous GPU, so that normed input and the residual
    stream both come in; `norm_out`: this GPU runs the input norm of the next GPU's first block."""
    events: list[Event] = []
    for r, (how, count, b) in enumerate(runs):
        if how == REMOTE_EXPERTS:  # all freed within the block: one is as high as many
            if norm_out:
                events += [("a", "n", b.x), ("f", "n")]
                norm_out = False
            events += [("f", "x"), *_remote_expert_events(b, gpu)]  # the residual stream has moved on
            continue
        # The run's last block is replayed: graph inputs are freed there, and the model's last block keeps
        # only the output rows; with experts copied in, the block before takes those rows' list in.
        final = ends_model and r == len(runs) - 1
        middle = max(count - RUN_HEAD - (2 if final and how == EXPERTS else 1), 0)
        for i in range(count - middle):
            if i == RUN_HEAD and middle:
                events.append(("R", r, middle, _middle_block(b, how, gpu)))
            last = final and i == count - middle - 1
            block = list(_block_events(b, how, last, gpu))
            if norm_in and r == i == 0:
                block[0] = ("i", "n", b.x)
                block.insert(block.index(("f", "x")), ("i", "x", b.x))
            events += [("L", r), *block]
    if norm_out and runs:
        events += [("a", "n", runs[-1][2].x), ("f", "n")]
    return events


# --- each backend

@lru_cache(maxsize=4096)
def gpu_compute_bytes(runs: tuple[Run, ...], inputs: GraphInputs, ends_model: bool, logits: float,
                      out_weight: float, pipeline: bool, norm_in: bool = False,
                      norm_out: bool = False) -> float:
    """One GPU's compute buffer. The residual stream comes in at its first split (the token embeddings, or
    the previous GPU's output); with pipeline parallelism every split input is kept in four copies from the
    start. `logits`: the output layer runs here (its weight copied in when in RAM: `out_weight`)."""
    if not runs and not logits:
        return 0.0
    sizes = inputs.sizes()
    held: Sequence[str] = ()
    if pipeline:  # the copies are graph outputs too: never freed, never taken over in place
        used = [k for k in INPUT_NAMES if runs and (k != "out_ids" or ends_model)]
        events: list[Event] = [("a", "copies", PIPELINE_COPIES * (inputs.embd + sum(sizes[k] for k in used)))]
        held = INPUT_NAMES
    else:
        events = [("s",)] if norm_in else [("s",), ("i", "x", inputs.embd)]
    events += _runs_events(runs, ends_model, True, norm_in, norm_out)
    if out_weight:
        events += [("s",), ("i", "W", out_weight)]
    if logits and pipeline and not runs:
        events.append(("a", "x", inputs.embd))  # the output norm cannot run in place on a copy
    events.append(("a", "logits", logits))  # the output norm runs in place on the residual stream
    return _replay(_resolve(events, sizes, held, held), GPU_ALIGN)


@lru_cache(maxsize=4096)
def host_compute_bytes(runs: tuple[Run, ...], inputs: GraphInputs, gpu_work: bool, ends_model: bool,
                       logits: float, pipeline: bool) -> float:
    """The host's compute buffer. Graph inputs come first (four copies of each with pipeline parallelism),
    then the token embeddings. When no GPU takes part the CPU runs the whole graph, freeing each input
    after its last use. Otherwise the inputs stay until a GPU has copied them: at its first split, or after
    the blocks the CPU runs; the host also takes K and V of GPU-run blocks whose cache is in RAM."""
    sizes = inputs.sizes()
    copies = PIPELINE_COPIES if pipeline else 1
    events: list[Event] = [("a", "tokens", copies * inputs.tokens), ("a", "embd", copies * inputs.embd)]
    events += [("a", k, copies * sizes[k]) for k in INPUT_NAMES]
    events += [("a", "x", inputs.embd), ("f", "tokens")]
    native = [r for r in runs if r[0] == NATIVE]
    events += _runs_events(native, ends_model, False)
    if not gpu_work:
        events.append(("a", "logits", logits))
        return _replay(_resolve(events, sizes, INPUT_NAMES), HOST_ALIGN)
    events.append(("f", "x"))
    events += [("f", k) for k in (INPUT_NAMES if native else ("pos", "k_rot", "v_rot"))]
    for how, _, b in runs:
        if how == STORE:  # two blocks: a GPU copies the mask for the first one's attention
            stored = (("a", "Kc", b.k), ("a", "Vc", b.v), ("f", "Kc"), ("f", "Vc"))
            events += [*stored, ("f", "mask"), *stored]
    events += [("f", k) for k in INPUT_NAMES]
    events += _runs_events([r for r in runs if r[0] == REMOTE_EXPERTS], False, False)
    events.append(("a", "logits", logits))
    return _replay(_resolve(events, sizes, INPUT_NAMES, INPUT_NAMES), HOST_ALIGN)


Segment = tuple[int, int, bool, BlockGraph]  # (device, how many blocks in a row, experts in RAM, graph)


def layer_segments(graphs: Sequence[BlockGraph], blocks: Sequence[int],
                   experts_on_host: Sequence[bool]) -> list[Segment]:
    """The blocks one by one, in the form `compute_buffers` takes them."""
    return [(d, 1, experts, b) for d, experts, b in zip(blocks, experts_on_host, graphs, strict=True)]


def compute_buffers(segments: Sequence[Segment], output: int, n_gpu: int, inputs: GraphInputs, logits: float,
                    out_weight: float, n_ubatch: int,
                    offload_gpu: int | None = 0) -> tuple[list[float], float]:
    """Compute buffer of each GPU and of the host, for the blocks in layer order (-1: the host) and the
    output layer on `output`. Blocks in RAM run on the first GPU that takes offloaded ops (`offload_gpu`;
    None: none does, as with only RPC devices, whose backend offloads nothing) when the batch is large
    enough, as do experts kept in RAM and an output layer kept there. With several GPUs and everything on
    them llama.cpp runs the pipeline in parallel, unless tensors are overridden (experts in RAM)."""
    offload = n_gpu > 0 and offload_gpu is not None and n_ubatch >= OFFLOAD_MIN_BATCH
    first = offload_gpu if offload and offload_gpu is not None else 0
    gpu_runs: list[list[list[Any]]] = [[] for _ in range(n_gpu)]
    host_runs: list[list[Any]] = []
    for device, count, experts, b in segments:
        away = experts and b.router > 0
        if device < 0 and offload:
            _add(gpu_runs[first], COPIED, b, count)
            _add(host_runs, STORE, b, count)
        elif device < 0:
            _add(host_runs, NATIVE, b, count)
        elif away and (not offload or device != first):  # its experts run on the CPU, or on the first GPU
            _add(gpu_runs[device], EXPERTS_GPU0 if offload else EXPERTS_AWAY, b, count)
            _add(gpu_runs[first] if offload else host_runs, REMOTE_EXPERTS, b, count)
        else:
            _add(gpu_runs[device], EXPERTS if away else NATIVE, b, count)
    devices = [device for device, count, _, _ in segments if count]
    last_gpu = devices[-1] if devices and devices[-1] >= 0 else first if offload else -1
    out_gpu = output if output >= 0 else first if offload else -1
    full = output >= 0 and min(devices, default=0) >= 0
    pipeline = n_gpu > 1 and full and not any(experts for _, count, experts, _ in segments if count)
    norm_in, norm_out = _handoffs(devices, n_gpu, offload and not full, first)
    gpus = [gpu_compute_bytes(_frozen(runs), inputs, g == last_gpu, logits if g == out_gpu else 0.0,
                              out_weight if g == out_gpu and output < 0 else 0.0, pipeline, norm_in[g],
                              norm_out[g]) for g, runs in enumerate(gpu_runs)]
    host = host_compute_bytes(_frozen(host_runs), inputs, out_gpu >= 0 or any(gpu_runs), last_gpu < 0,
                              logits if out_gpu < 0 else 0.0, pipeline)
    return gpus, host


def _add(runs: list[list[Any]], how: int, b: BlockGraph, count: int) -> None:
    """Count blocks into their backend's runs: [how, count, merged graph, last graph merged]."""
    if not count:
        return
    if runs and runs[-1][0] == how:
        run = runs[-1]
        run[1] += count
        if run[3] is not b:
            run[2], run[3] = run[2].merge(_as_run(b, how)), b
    else:
        runs.append([how, count, _as_run(b, how), b])


def _frozen(runs: list[list[Any]]) -> tuple[Run, ...]:
    return tuple((how, count, b) for how, count, b, _ in runs)


@lru_cache(maxsize=1024)
def _as_run(b: BlockGraph, how: int) -> BlockGraph:
    """The graph without the weights a run of this kind does not copy in: quantizations of one model
    then share their replays wherever the weights stay put."""
    if how == COPIED:
        return b
    experts = b.w_experts if how in (EXPERTS, REMOTE_EXPERTS) else 0.0
    return replace(b, w_q=0.0, w_k=0.0, w_v=0.0, w_o=0.0, w_ffn=0.0, w_down=0.0, w_router=0.0,
                   w_experts=experts)


def _handoffs(devices: Sequence[int], n_gpu: int, partial: bool,
              first: int = 0) -> tuple[list[bool], list[bool]]:
    """GPUs whose first block's input norm runs on the GPU before, and those GPUs: with partial offload
    llama.cpp does not pin norms to their layer's device, and the scheduler extends the previous GPU.
    `devices`: the device of each segment of blocks, in layer order."""
    norm_in, norm_out = [False] * n_gpu, [False] * n_gpu
    if partial:
        runner = [d if d >= 0 else first for d in devices]  # with op offload, the first GPU runs RAM's blocks
        for i in range(1, len(devices)):
            if devices[i] >= 0 and runner[i] != runner[i - 1]:
                norm_in[runner[i]] = norm_out[runner[i - 1]] = True
    return norm_in, norm_out


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
                     cpu_repack: bool = True, offload_gpu: int | None = 0) -> Breakdown:
    """MiB per device for one configuration. `gpu_free` lists each GPU's free MiB (it decides the split
    between GPUs); empty means a CPU-only build. `cpu_repack`: the CPU has AVX2 (section 8 of the
    reference: Q4_0/Q4_K/IQ4_NL matrices are copied into a faster layout)."""
    return LayerTable(as_layout(model)).breakdown(params, gpu_free, cpu_repack, offload_gpu)


def _block_sums(block: Sequence[Matrix]) -> tuple[int, int, int, int]:
    """Bytes of a block: all, routed experts, repackable, repackable experts. One pass: it runs for every
    block of every catalog file."""
    total = experts = repack = expert_repack = 0
    for m in block:
        total += m.nbytes
        if m.repackable:
            repack += m.nbytes
        if m.expert:
            experts += m.nbytes
            expert_repack += m.nbytes if m.repackable else 0
    return total, experts, repack, expert_repack


def _prefix_sums(values: Iterable[int]) -> list[int]:
    """[0, v0, v0 + v1, ...]: the sum over blocks [a, b) is sums[b] - sums[a]."""
    return list(accumulate(values, initial=0))


@dataclass(frozen=True)
class _AttentionTable:
    """Per-layer figures that depend on the run settings (context, ubatch, KV types, flash attention)."""

    kv: list[float]  # kv_layer_bytes
    graphs: list[BlockGraph]  # block_graph: the same object for layers alike
    alike: list[int]  # where a run of blocks with the same graph starts, and n_layer
    inputs: GraphInputs
    output: tuple[float, float]  # output_bytes


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
        self.shapes = [_block_shape(layout, il) for il in range(info.n_layer)]
        self.widths = [kv_widths(info, il) for il in range(info.n_layer)]
        # Layers alike for the KV cache (widths, sliding window, recurrent state) get the same figures:
        # each kind is worked out once, on its first layer. Most models have one or two kinds.
        self.kinds = [(w, bool(info.swa_layers and info.swa_layers[il]),  # ((w_k, w_v), swa, recurrent)
                       bool(info.recurrent_layers and info.recurrent_layers[il]))
                      for il, w in enumerate(self.widths)]
        self.first_of_kind = {kind: il for il, kind in reversed(list(enumerate(self.kinds)))}
        self._attention: dict[tuple[object, ...], Attention] = {}
        self._tables: dict[Attention, _AttentionTable] = {}
        self._compute: dict[tuple[object, ...], tuple[list[float], float]] = {}

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
        kv_of = {kind: _kv_layer_bytes(info, att, il, widest) for kind, il in self.first_of_kind.items()}
        graphs: dict[tuple[object, ...], BlockGraph] = {}
        for il, kind in enumerate(self.kinds):  # layers alike (KV kind, heads, block shape) share one graph
            key = (kind, info.n_head[il], self.shapes[il])
            if key not in graphs:
                graphs[key] = _graph(info, att, il, self.shapes[il])
        per_layer = [graphs[kind, info.n_head[il], self.shapes[il]] for il, kind in enumerate(self.kinds)]
        alike = [0] + [il for il in range(1, info.n_layer) if per_layer[il] is not per_layer[il - 1]]
        return _AttentionTable(
            kv=[kv_of[kind] for kind in self.kinds],
            graphs=per_layer,
            alike=[*alike, info.n_layer] if info.n_layer else [0],
            inputs=graph_inputs(info, att),
            output=output_bytes(self.layout, att),
        )

    def compute(self, att: Attention, t: _AttentionTable, spans: _Spans, n_cpu_moe: int,
                n_gpu: int, offload_gpu: int | None = 0) -> tuple[list[float], float]:
        """`compute_buffers` for blocks placed as `spans` say."""
        key = (att, spans, n_cpu_moe, n_gpu, offload_gpu)
        if key not in self._compute:
            host_end, ranges, output = spans
            cuts = [(0, -1), (host_end, -1)] + [(a, g) for g, (a, b) in enumerate(ranges) if b > a]
            cuts = sorted({*cuts, *((il, -2) for il in (*t.alike, n_cpu_moe))})  # -2: no change of device
            segments, device = [], -1
            for (a, d), (b, _) in pairwise(cuts):
                device = device if d == -2 else d
                if a < b <= self.info.n_layer:
                    segments.append((device, b - a, a < n_cpu_moe, t.graphs[a]))
            self._compute[key] = compute_buffers(segments, output, n_gpu, t.inputs, *t.output, att.n_ubatch,
                                                 offload_gpu)
        return self._compute[key]

    def breakdown(self, params: FitParams, gpu_free: Sequence[float], cpu_repack: bool,
                  offload_gpu: int | None = 0) -> Breakdown:
        """`offload_gpu`: the GPU that runs large-batch work of weights kept in RAM (the first local one;
        None when every device is an RPC device, which llama.cpp never offloads ops to)."""
        info = self.info
        att = self.attention(params)
        ngl = info.n_layer + 1 if params.gpu_layers is None else params.gpu_layers
        n_cpu_moe = info.n_layer if params.cpu_moe else min(params.n_cpu_moe, info.n_layer)
        if not info.is_moe:
            n_cpu_moe = 0
        spans = _spans(info.n_layer, ngl, tuple(gpu_free))
        t = self.for_attention(att)
        gpu_compute, host_compute = self.compute(att, t, spans, n_cpu_moe, len(gpu_free), offload_gpu)
        gpus = [self._gpu_memory(t, spans, g, n_cpu_moe, gpu_compute[g]) for g in range(len(gpu_free))]
        host = self._host_memory(att, t, spans, n_cpu_moe, cpu_repack, host_compute)
        ngl = 0 if not gpu_free else max(0, min(ngl, info.n_layer + 1))
        return Breakdown(att.n_ctx, att.n_ubatch, ngl, info.n_layer, att.type_k, att.type_v, att.flash_attn,
                         n_cpu_moe, gpus, host)

    def _gpu_memory(self, t: _AttentionTable, spans: _Spans, g: int, n_cpu_moe: int,
                    compute: float) -> DeviceMemory:
        info, layout = self.info, self.layout
        _, ranges, output = spans
        a, b = ranges[g]
        moe = min(max(n_cpu_moe, a), b)  # blocks [a, moe) keep their routed experts in RAM
        weights = self.weights[b] - self.weights[a] - (self.expert_weights[moe] - self.expert_weights[a])
        if output == g:
            weights += self.output_weights
            weights += layout.token_embd if info.tied_output else 0  # tied output: a copy of the embedding
        kv = sum(t.kv[a:b])
        return DeviceMemory(f"GPU{g}", mib(weights), mib(kv), mib(compute), float(CUDA_CONTEXT_MIB))

    def _host_memory(self, att: Attention, t: _AttentionTable, spans: _Spans, n_cpu_moe: int,
                     cpu_repack: bool, compute: float) -> HostMemory:
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
    # The last device (llama.cpp gives it the output layer) is on another machine: the output layer stays
    # here, so the logits (n_vocab floats a token) never cross the network.
    output_stays_local: bool = False
    offload_gpu: int | None = 0  # the first GPU llama.cpp sends large-batch work to: RPC devices take none
    # Per GPU: its memory is the RAM (Apple silicon, an integrated GPU). What it holds comes out of
    # `ram_usable` too, and its `gpu_usable` is already capped by the RAM budget.
    unified: list[bool] = field(default_factory=list)

    def fits(self, bd: Breakdown) -> bool:
        if bd.gpus and len(bd.gpus) != len(self.gpu_usable):
            return False
        gpus_ok = all(d.total_mib <= cap for d, cap in zip(bd.gpus, self.gpu_usable, strict=False))
        return gpus_ok and self.ram_need(bd) <= self.ram_usable

    def ram_need(self, bd: Breakdown) -> float:
        """RAM a configuration takes: the host's share, plus what unified-memory GPUs hold (counted once:
        the host's share never includes what is placed on a GPU)."""
        shared = sum(d.total_mib for d, u in zip(bd.gpus, self.unified, strict=False) if u)
        return bd.host.total_mib + shared


def budget_for(report: HardwareReport, extra_host_mib: float = 0.0) -> Budget:
    gpus = report.usable_gpus
    ram_margin = max(RAM_MARGIN_MIN_MIB, RAM_MARGIN_FRACTION * report.ram_total_mib)
    ram_usable = report.ram_available_mib - ram_margin - extra_host_mib
    usable = [gpu_usable_mib(g, ram_usable) for g in gpus]
    return Budget([float(g.free_mib) for g in gpus], usable, ram_usable,
                  report.cpu.avx2, list(gpus), [gpu_overhead_mib(g) for g in gpus],
                  output_stays_local=bool(gpus) and is_remote(gpus[-1]),
                  offload_gpu=next((g for g, gpu in enumerate(gpus) if not gpu.rpc_endpoint), None),
                  unified=[g.unified for g in gpus])


def gpu_usable_mib(gpu: GPUInfo, ram_usable: float) -> float:
    """A GPU's free memory less its margin. A unified-memory GPU's free figure is a ceiling (Metal: the
    working-set limit it recommends, about two thirds to three quarters of the RAM), not memory set aside
    for it: it gets no more than the RAM budget either."""
    own = gpu.free_mib - device_margin_mib(gpu)
    return min(own, ram_usable) if gpu.unified else own


def is_remote(gpu: GPUInfo) -> bool:
    """A device on another machine: reached over RPC at an address that is not this machine's loopback."""
    if not gpu.rpc_endpoint:
        return False
    host = gpu.rpc_endpoint.rpartition(":")[0].strip("[]")
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def device_margin_mib(gpu: GPUInfo) -> float:
    """What a device keeps free: a GPU a safety margin of its VRAM; a worker lending its CPU the reserve
    RAM needs (its system and programs live there too)."""
    if gpu.kind == "cpu":
        return max(RAM_MARGIN_MIN_MIB, RAM_MARGIN_FRACTION * gpu.total_mib)
    return max(GPU_MARGIN_MIN_MIB, GPU_MARGIN_FRACTION * gpu.total_mib)


def gpu_overhead_mib(gpu: GPUInfo) -> float:
    """Memory llama.cpp takes on a GPU beyond the buffers it logs: what an earlier load on this GPU and
    driver measured, else the CUDA context measured on an H100. An RPC device's server holds its own
    context on its own machine; a CPU server has none. Metal has no CUDA context; what it holds beyond
    the buffers was not measured (no Mac here), so it gets none. Vulkan and ROCm keep the CUDA figure:
    their driver contexts were not measured either, and the larger figure errs on the side of fitting."""
    if gpu.overhead_mib is not None:
        return gpu.overhead_mib
    return 0.0 if gpu.rpc_endpoint or gpu.on_metal else float(CUDA_CONTEXT_MIB)


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
            return _verdict_of(full), full
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
    n_layer = table.info.n_layer
    if budget.output_stays_local and (params.gpu_layers is None or params.gpu_layers > n_layer):
        params = replace(params, gpu_layers=n_layer)
    bd = table.breakdown(params, budget.gpu_free, budget.cpu_repack, budget.offload_gpu)
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
    ram = f"{gb(round(budget.ram_need(bd)))} of RAM"  # with what a unified-memory GPU holds
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
        need = gb(round(p.budget.ram_need(p.breakdown)))  # a unified-memory GPU's share included
        have = gb(max(0, round(p.budget.ram_usable)))
        text = f"does not fit: at {ctx} it needs {need} of RAM and only {have} is usable"
    if p.max_ctx:
        return f"{text}; the largest context that runs is {p.max_ctx} tokens"
    return f"{text}, even at the smallest context"
