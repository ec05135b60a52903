"""How fast a planned model runs: tokens per second while it writes, while it reads the prompt, and the wait
for the first reply when the whole context has to be read (a new chat, or the chat after a model swap).

Writing (decode) streams every weight a token uses once per token: its time is the bytes each device
reads divided by that device's memory bandwidth. Reading the prompt (prompt processing) goes 512 tokens
at a time and is bound by arithmetic: two FLOPs per weight per token, plus attention over the tokens
before it. The guide's warning is about this second figure: the CPU is much slower than a GPU
"especially during prompt processing", and a chat that starts at 8k tokens waits for all of it.

Where the figures come from:

* **This machine's CPU** is measured once (`bridge.calibrate`): a small model of real Q4_K blocks reads a
  prompt and writes a few tokens; bytes per token x tokens/s is the CPU's usable bandwidth and FLOPs per
  token x tokens/s its usable compute. Every model is then scaled from those two numbers by its own
  bytes and FLOPs (`ModelCost`). Machines that were not measured (a what-if with other hardware, the
  tests' profiles) use the estimates below and say so.
* **A GPU** is not measured (a small model cannot keep one busy): decode at 70 % of its memory bandwidth
  (fit-reference.md 5.5.3), prompt processing at GPU_FLOP_PER_BYTE FLOPs per byte/s of bandwidth.
* **Devices on other machines** (workers, RPC servers) add their network round trips: two per written token
  (the activations go over and the graph runs; llama.cpp's RPC is request/response per command), measured
  once per worker as the median TCP connect time. A worker that lends its CPU computes like this machine's
  CPU does per byte/s of its bandwidth.
* **Layers and experts kept in RAM next to a GPU**: llama.cpp copies their weights to the GPU for each
  batch of the prompt (fit-reference.md 1.3: a CUDA build offloads large-batch matrix products), so their
  prompt time is the copy over PCIe, once per 512 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from . import fit
from .hardware import GPUInfo, HardwareReport, estimate_cpu_bandwidth

N_UBATCH = 512  # tokens per prompt batch (llama.cpp's and the engine's default)
BANDWIDTH_EFFICIENCY = 0.7  # decode reaches 60-80 % of peak memory bandwidth (fit-reference 5.5.3)
DEFAULT_GPU_BANDWIDTH_GBS = 448.0  # a mid-range card, when NVML could not tell
# Prompt processing on a GPU, in FLOP/s per byte/s of memory bandwidth. An RTX 3090 (936 GB/s) reads an
# 8B Q6_K prompt at 3491 tokens/s (llama.cpp PR #7860, int8 tensor cores): 3491 x 2 x 7.5e9 FLOPs = 52
# TFLOP/s, 56 per byte/s. Newer cards do more per byte (an RTX 4090 reaches 10359 tokens/s on 8B Q4_0,
# PR #7676, ~150 per byte/s): 56 keeps the wait an upper bound.
GPU_FLOP_PER_BYTE = 56.0
# A CPU core that was not measured: ~140 GFLOP/s on Q4_K prompt batches. Measured here on one AVX2 core
# of an AMD EPYC (bridge.calibrate); ik_llama.cpp PR #122 gives 159 tokens/s for Llama-3.1-8B Q6_0 on a
# 16-core Ryzen 7950X, ~150 GFLOP/s per core.
CPU_GFLOPS_PER_CORE = 140.0
# Host-to-GPU copies of weights kept in RAM, during prompt batches: PCIe 3.0 x16 in practice (4.0 doubles it).
PCIE_GBS = 12.0
RPC_ROUND_TRIPS_PER_TOKEN = 2


@dataclass(frozen=True)
class CpuSpeed:
    """What the CPU sustains for llama.cpp: bytes/s streamed while writing, FLOP/s while reading a prompt."""

    bytes_per_s: float
    flops_per_s: float
    measured: bool
    note: str

    @classmethod
    def estimated(cls, report: HardwareReport) -> CpuSpeed:
        cores = max(report.cpu.cores_physical, 1)
        gbs = report.cpu_bandwidth_gbs or estimate_cpu_bandwidth(cores)
        return cls(gbs * 1e9 * BANDWIDTH_EFFICIENCY, cores * CPU_GFLOPS_PER_CORE * 1e9, False,
                   f"estimated from {cores} cores and ~{gbs:g} GB/s of RAM bandwidth")


@dataclass(frozen=True)
class ModelCost:
    """A model's work per token, from its tensor table: what decode streams and prompt tokens compute."""

    total_bytes: int
    embd_bytes: int  # the token embedding: one row per token, not streamed (unless the output shares it)
    output_bytes: int  # the output matrix: every written token, only the last token of a prompt batch
    tied_output: bool
    active: float  # share of the weights a token uses (routed experts: the ones it is sent to)
    bytes_per_param: float
    n_layer: int
    q_width: int  # attention heads x K head size
    kv_len_limits: tuple[int, ...]  # per layer: the sliding window, or 0 for the whole context

    @classmethod
    def of(cls, layout: fit.ModelLayout) -> ModelCost:
        info = layout.info
        heads = max(info.n_head or [0])
        output = sum(m.nbytes for m in layout.output)
        active = info.n_params_active / info.n_params if info.n_params else 1.0
        swa = info.swa_layers or [False] * info.n_layer
        windows = tuple(info.sliding_window if on else 0 for on in swa)
        return cls(layout.total_bytes, layout.token_embd, output, info.tied_output, active,
                   layout.total_bytes / max(info.n_params, 1), info.n_layer, heads * info.head_dim_k, windows)

    def attention_flops(self, kv_len: float) -> float:
        """FLOPs of attention for one token that sees `kv_len` tokens before it (QK and AV, all layers)."""
        seen = sum(min(kv_len, w) if w else kv_len for w in self.kv_len_limits)
        return 4.0 * self.q_width * seen

    def prompt_flops(self, weight_bytes: float, kv_len: float, layer_share: float) -> float:
        """FLOPs per prompt token for `weight_bytes` of matrices (and their layers' share of attention)."""
        params = weight_bytes / self.bytes_per_param
        return 2.0 * params * self.active + self.attention_flops(kv_len) * layer_share


@dataclass
class Prediction:
    decode_tok_s: float
    prompt_tok_s: float  # averaged over a prompt that fills the context
    first_reply_s: float  # the whole context read, then the first token written
    n_ctx: int
    cpu: str  # where the CPU's figures come from
    devices: list[dict[str, object]] = field(default_factory=list)  # each device's share of the time

    def to_dict(self) -> dict[str, object]:
        return {"decode_tok_s": round(self.decode_tok_s, 1), "prompt_tok_s": round(self.prompt_tok_s, 1),
                "first_reply_s": round(self.first_reply_s, 2), "n_ctx": self.n_ctx, "cpu": self.cpu,
                "devices": self.devices}


def predict(cost: ModelCost, bd: fit.Breakdown, report: HardwareReport, cpu: CpuSpeed,
            prompt_tokens: int | None = None) -> Prediction:
    """Speeds of the placement `bd` on this machine; the prompt fills `prompt_tokens` (the whole context)."""
    n_prompt = prompt_tokens or bd.n_ctx
    gpus = report.usable_gpus
    decode = decode_terms(cost, bd, gpus, cpu)
    prompt = prompt_terms(cost, bd, gpus, cpu, kv_len=n_prompt / 2)
    decode_s, prompt_s = sum(decode), sum(prompt)
    names = [fit.device_name(gpu, i) for i, gpu in enumerate(gpus[:len(bd.gpus)])] + ["CPU"]
    network = [network_seconds(gpu) for gpu in gpus[:len(bd.gpus)]] + [0.0]
    devices: list[dict[str, object]] = [
        {"device": name, "decode_ms_per_token": round(d * 1000, 3), "prompt_ms_per_token": round(q * 1000, 3)}
        | ({"network_ms_per_token": round(n * 1000, 3)} if n else {})
        for name, d, q, n in zip(names, decode, prompt, network, strict=False)
    ]
    return Prediction(1 / decode_s if decode_s else 0.0, 1 / prompt_s if prompt_s else 0.0,
                      n_prompt * prompt_s + decode_s, bd.n_ctx, cpu.note, devices)


def decode_seconds(cost: ModelCost, bd: fit.Breakdown, gpus: Sequence[GPUInfo], cpu: CpuSpeed) -> float:
    return sum(decode_terms(cost, bd, gpus, cpu))


def prompt_seconds(cost: ModelCost, bd: fit.Breakdown, gpus: Sequence[GPUInfo], cpu: CpuSpeed,
                   kv_len: float) -> float:
    return sum(prompt_terms(cost, bd, gpus, cpu, kv_len))


def decode_terms(cost: ModelCost, bd: fit.Breakdown, gpus: Sequence[GPUInfo], cpu: CpuSpeed) -> list[float]:
    """Seconds per written token on each device (GPUs, then the host): each streams its weights (a
    token's share of the experts) and half the context's KV cache (a chat midway), one after the other."""
    terms = [(dev.weights_mib * cost.active + dev.kv_mib / 2) * fit.MIB / _gpu_bandwidth(gpu)
             + (network_seconds(gpu) if dev.weights_mib else 0.0)
             for dev, gpu in zip(bd.gpus, gpus, strict=False)]
    embd = 0 if cost.tied_output else cost.embd_bytes
    host = max(bd.host.weights_mib * fit.MIB - embd, 0.0)
    return [*terms, (host * cost.active + bd.host.kv_mib / 2 * fit.MIB) / cpu.bytes_per_s]


def prompt_terms(cost: ModelCost, bd: fit.Breakdown, devices: Sequence[GPUInfo], cpu: CpuSpeed,
                 kv_len: float) -> list[float]:
    """Seconds per prompt token, for a token that sees `kv_len` tokens before it, on each device (GPUs,
    then the work on the host's weights)."""
    gpus = list(zip(bd.gpus, devices, strict=False))
    layers_on_gpu = min(bd.gpu_layers, bd.n_layer) / max(bd.n_layer, 1)
    output_on_gpu = bool(gpus) and bd.gpu_layers > bd.n_layer
    on_gpus = max(sum(d.weights_mib for d, _ in gpus), 1e-9)
    terms = []
    for i, (dev, gpu) in enumerate(gpus):
        holds_output = output_on_gpu and i == len(gpus) - 1
        weights = dev.weights_mib * fit.MIB - (cost.output_bytes if holds_output else 0)
        share = layers_on_gpu * dev.weights_mib / on_gpus
        terms.append(cost.prompt_flops(max(weights, 0.0), kv_len, share) / _device_flops(gpu, cpu))
    host = bd.host.weights_mib * fit.MIB - cost.embd_bytes - (0 if output_on_gpu else cost.output_bytes)
    host_flops = cost.prompt_flops(max(host, 0.0), kv_len, 1.0 - layers_on_gpu)
    # A local GPU computes the batch; the host's weights (a batch uses all the experts) cross PCIe. Devices
    # on other machines take no such work (llama.cpp's RPC backend offloads no ops): the host computes it.
    local = next((gpu for _, gpu in gpus if not gpu.rpc_endpoint), None)
    if local is not None:
        return [*terms, max(host, 0.0) / (PCIE_GBS * 1e9 * N_UBATCH) + host_flops / _gpu_flops(local)]
    return [*terms, host_flops / cpu.flops_per_s]


def network_seconds(gpu: GPUInfo) -> float:
    """Round trips per written token to a device on another machine (0 for this machine's own)."""
    if not gpu.rpc_endpoint or not gpu.rtt_ms:
        return 0.0
    return RPC_ROUND_TRIPS_PER_TOKEN * gpu.rtt_ms / 1000


def _device_flops(gpu: GPUInfo, cpu: CpuSpeed) -> float:
    if gpu.kind == "cpu":  # a worker lending its CPU: this machine's FLOPs per byte/s of bandwidth
        return _gpu_bandwidth(gpu) * cpu.flops_per_s / cpu.bytes_per_s
    return _gpu_flops(gpu)


def _gpu_bandwidth(gpu: GPUInfo) -> float:
    return (gpu.bandwidth_gbs or DEFAULT_GPU_BANDWIDTH_GBS) * 1e9 * BANDWIDTH_EFFICIENCY


def _gpu_flops(gpu: GPUInfo) -> float:
    return (gpu.bandwidth_gbs or DEFAULT_GPU_BANDWIDTH_GBS) * 1e9 * GPU_FLOP_PER_BYTE


def describe_wait(seconds: float) -> str:
    """A wait as a person says it: "~4 s", "~2 min", "~1.5 h"."""
    if seconds < 90:
        return f"~{max(seconds, 0.1):.0f} s" if seconds >= 1 else f"~{seconds:.1f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
