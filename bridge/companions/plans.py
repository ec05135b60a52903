"""Companions in the memory budget: what an embedding model and a vision projector take, where they go,
and the machine the chat model is planned on once they have their share.

An embedding model runs on the CPU (KoboldCpp's default too): its weights (read into memory, not mapped),
its KV cache when it is a causal decoder (Qwen3-Embedding) and its compute buffer count against the RAM.
A projector lives in the chat worker: on the first local GPU when the machine offloads to one (as mtmd
places it) and it fits there, else in RAM; its weights and the compute buffer of one image count there.

The compute buffers are estimates from the shapes, checked against what llama.cpp allocates for the test
fixtures (tests/test_companion_plans.py): llama.cpp uses flash attention on the CPU and CUDA, so an
encoder's attention costs its f16 mask (tokens²) rather than a score matrix per head.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

from .. import fit
from ..errors import NotEnoughMemory
from ..gguf import GGUFHeader, model_info
from ..hardware import HardwareReport
from .families import ENCODER_ARCHITECTURES

MIB = 1 << 20
HOST = "CPU"


@dataclass
class CompanionPlan:
    """One companion's memory, on one device (`CPU`, or a GPU's llama.cpp name such as CUDA0)."""

    role: str  # "embedding" | "vision"
    model_id: str
    device: str
    weights_mib: float
    kv_mib: float
    compute_mib: float
    gpu_index: int | None = None  # which GPU of the report, when `device` is one

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.kv_mib + self.compute_mib

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("gpu_index")
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in data.items()} | {
            "total_mib": round(self.total_mib, 1)}


def tensor_mib(header: GGUFHeader) -> float:
    return sum(t.nbytes for t in header.tensors) / MIB


def plan_embedding(header: GGUFHeader, model_id: str, n_ctx: int) -> CompanionPlan:
    """An embedding model on the CPU with an `n_ctx`-token context (one ubatch of that size)."""
    info = model_info(header)
    tokens = min(n_ctx, info.n_ctx_train or n_ctx)
    causal = info.architecture not in ENCODER_ARCHITECTURES
    kv = 0.0
    if causal:
        heads_kv = max(info.n_head_kv or [0])
        kv = info.n_layer * tokens * heads_kv * (info.head_dim_k + info.head_dim_v) * 2 / MIB  # f16
    ff = max(info.n_ff or [4 * info.n_embd])
    # Flash attention: the f16 mask (tokens x cells), activations of a few widths per token, and the
    # output buffer (one float vector per token).
    compute = (2 * tokens * tokens + 4 * tokens * (5 * info.n_embd + 2 * ff)) / MIB
    return CompanionPlan("embedding", model_id, HOST, tensor_mib(header), kv, compute)


def plan_projector(header: GGUFHeader, model_id: str, report: HardwareReport | None = None) -> CompanionPlan:
    """A vision projector, with the compute buffer of one image at the projector's own size."""
    size = int(header.get("clip.vision.image_size") or 0)
    patch = int(header.get("clip.vision.patch_size") or 0) or 14
    width = int(header.get("clip.vision.embedding_length") or 0)
    ff = int(header.get("clip.vision.feed_forward_length") or 4 * width)
    heads = int(header.get("clip.vision.attention.head_count") or 1)
    patches = (size // patch) ** 2 if size else 576
    # Attention scores per head (clip runs without flash attention by default) and the widest activations.
    compute = 4 * (heads * patches * patches + patches * (4 * width + 2 * ff)) / MIB
    plan = CompanionPlan("vision", model_id, HOST, tensor_mib(header), 0.0, compute)
    if report is not None:
        place_on_gpu(plan, report)
    return plan


def place_on_gpu(plan: CompanionPlan, report: HardwareReport) -> None:
    """Move `plan` to the first local GPU (mtmd's choice) when the build offloads and it fits there."""
    for index, gpu in enumerate(report.usable_gpus):
        if gpu.rpc_endpoint:
            continue
        if gpu.free_mib - fit.device_margin_mib(gpu) >= plan.total_mib:
            plan.device, plan.gpu_index = fit.device_name(gpu, gpu.index), index
        return


def ram_usable_mib(report: HardwareReport, extra_host_mib: float = 0.0) -> float:
    return fit.budget_for(report, extra_host_mib).ram_usable


def check_fits(plan: CompanionPlan, report: HardwareReport, beside: str = "") -> None:
    """NotEnoughMemory, before anything loads, when `plan` does not fit in what `report` has free."""
    if plan.device == HOST:
        free = ram_usable_mib(report)
    else:
        gpu = report.usable_gpus[plan.gpu_index or 0]
        free = gpu.free_mib - fit.device_margin_mib(gpu)
    if plan.total_mib <= free:
        return
    raise NotEnoughMemory(
        f"the {_role(plan)} {plan.model_id} does not fit: it needs {plan.total_mib:.0f} MiB "
        f"({plan.weights_mib:.0f} weights, {plan.kv_mib + plan.compute_mib:.0f} cache and compute) and "
        f"{max(free, 0):.0f} MiB of {_memory(plan)} is free{beside}", needed_mib=round(plan.total_mib),
        free_mib=round(max(free, 0)))


def reserve(report: HardwareReport, plans: list[CompanionPlan]) -> HardwareReport:
    """The machine with the companions' memory taken: what the chat model is planned on."""
    if not plans:
        return report
    left = copy.deepcopy(report)
    gpus = left.usable_gpus
    for plan in plans:
        if plan.device == HOST:
            left.ram_available_mib = max(0, left.ram_available_mib - math.ceil(plan.total_mib))
        elif plan.gpu_index is not None and plan.gpu_index < len(gpus):
            gpus[plan.gpu_index].free_mib = max(0, gpus[plan.gpu_index].free_mib - math.ceil(plan.total_mib))
    return left


def beside_note(plans: list[CompanionPlan]) -> str:
    """How the companions' share reads in a refusal: "beside the embedding model X (120 MiB, RAM) ..."."""
    if not plans:
        return ""
    parts = [f"the {_role(p)} {p.model_id} ({p.total_mib:.0f} MiB, {_memory(p)})" for p in plans]
    return " beside " + " and ".join(parts)


def _role(plan: CompanionPlan) -> str:
    return "embedding model" if plan.role == "embedding" else "vision projector"


def _memory(plan: CompanionPlan) -> str:
    return "RAM" if plan.device == HOST else f"{plan.device} memory"
