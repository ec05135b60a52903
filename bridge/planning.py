"""Plans for loads, on the memory the machine will have when they run.

A load replaces the model that serves now, so it is planned against the memory the machine will have
once that model is gone: the free figures the probe reads now, plus what the loaded model's worker
holds (measured, not planned). The quant badges, the models list and the recommendations use the same
machine. Every plan says which budget it used.

Then `plan_load` turns the request's settings, the config's and the planner's choices into the load
spec's fields, including the placement (devices, layers per device, experts in RAM) llama.cpp is given.
A planner failure refuses the load with its reason: loading with llama.cpp's defaults would put every
layer on the GPU of a CUDA build, whatever the memory.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fit
from .devices.actual import HOST
from .devices.placement import DevicePlacement
from .errors import BridgeError, NotEnoughMemory, PlanFailed
from .gguf import GGUFHeader, ModelInfo, model_info
from .hardware import HardwareReport

log = logging.getLogger(__name__)
FLASH_MODES = {True: "on", False: "off", None: "auto"}


@dataclass
class LoadedUse:
    """What the loaded model's worker holds: MiB per llama.cpp GPU device, and anonymous RAM."""

    model_id: str
    gpu_mib: dict[str, float] = field(default_factory=dict)
    ram_mib: float = 0.0
    measured_by: str = "llama.cpp's buffers"
    per_process: dict[str, float] = field(default_factory=dict)  # NVML's own per-process figures

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_id, "gpu_mib": {k: round(v) for k, v in self.gpu_mib.items()},
                "ram_mib": round(self.ram_mib), "measured_by": self.measured_by}


def loaded_use(model_id: str, pid: int | None, allocation: dict[str, Any], gpus: list[Any]) -> LoadedUse:
    """Measure what a worker holds: per GPU, NVML's figure for its process where NVML has one, else its
    llama.cpp buffers plus the GPU's overhead; in RAM, its anonymous memory (the weights it maps from
    the file are page cache, which the machine already counts as available)."""
    from .hardware import process_gpu_mib

    buffers = {name: float(use.get("total_mib", 0.0)) for name, use in allocation.get("devices", {}).items()}
    use = LoadedUse(model_id)
    measured = process_gpu_mib(pid, gpus=gpus) if pid else {}
    use.per_process = measured
    for gpu in gpus:
        name = fit.device_name(gpu, gpu.index)
        if name in measured:
            use.gpu_mib[name] = measured[name]
            use.measured_by = "NVML (per process)"
        elif name in buffers:
            use.gpu_mib[name] = buffers[name] + fit.gpu_overhead_mib(gpu)
    use.ram_mib = process_anonymous_mib(pid) if pid else buffers.get(HOST, 0.0)
    return use


def process_anonymous_mib(pid: int) -> float:
    """Anonymous memory of a process (what its exit gives back), in MiB; its RSS where that is unknown."""
    smaps = Path(f"/proc/{pid}/smaps_rollup")
    try:
        if sys.platform.startswith("linux") and smaps.exists():
            for line in smaps.read_text().splitlines():
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) / 1024
        import psutil

        return psutil.Process(pid).memory_info().rss / (1 << 20)
    except (OSError, ValueError, ImportError):
        return 0.0
    except Exception:  # psutil.NoSuchProcess and friends: the worker is gone, it holds nothing
        return 0.0


def after_unload(report: HardwareReport, loaded: LoadedUse | None) -> HardwareReport:
    """The machine as it will be once the loaded model is gone: its measured use added back."""
    if loaded is None or report.hypothetical:
        return report
    freed = copy.deepcopy(report)
    for gpu in freed.gpus:
        held = loaded.gpu_mib.get(fit.device_name(gpu, gpu.index), 0.0)
        gpu.free_mib = min(gpu.total_mib, gpu.free_mib + round(held))
    freed.ram_available_mib = min(freed.ram_total_mib, freed.ram_available_mib + round(loaded.ram_mib))
    return freed


def budget_note(loaded: LoadedUse | None) -> str:
    if loaded is None:
        return "the free memory now (no model is loaded)"
    return (f"the memory free once {loaded.model_id} is unloaded (its measured use added back: "
            f"{', '.join(f'{k} {v:.0f} MiB' for k, v in loaded.gpu_mib.items()) or 'no GPU'}, "
            f"RAM {loaded.ram_mib:.0f} MiB)")


# --- a load's settings ----------------------------------------------------------------------------------

@dataclass
class LoadPlan:
    n_ctx: int
    kv_type: str | None
    flash_attn: bool | None
    placement: DevicePlacement
    summary: dict[str, Any]  # what the status and the events show: verdict, reason, devices ...
    mmproj_path: str | None = None  # the vision projector planned beside the model (bridge.companions)
    mmproj_gpu: bool = False


def plan_load(header: GGUFHeader, report: HardwareReport, chosen: dict[str, Any],
              extra_host_mib: float = 0.0, budget: str = "") -> LoadPlan:
    """`chosen`: n_ctx, n_gpu_layers (-1 = all), kv_type, flash_attn as the request and config fixed
    them (None = the planner decides)."""
    info = model_info(header)
    params = _fit_params(info, chosen, extra_host_mib)
    try:
        result = fit.plan(header, report, params)
    except BridgeError:
        raise  # settings the planner refuses (e.g. a q8_0 V cache without flash attention)
    except Exception as exc:
        log.exception("the fit planner failed")
        raise PlanFailed(f"could not plan how to load {info.name or 'this model'}: {exc}") from exc
    summary = result.to_dict()
    if result.verdict == "wont_fit":
        raise NotEnoughMemory(f"{info.name or 'this model'} does not fit: {result.reason}")
    bd = result.breakdown
    placement = result.placement()
    summary |= {"n_gpu_layers": bd.gpu_layers, "placement": placement.to_dict(), "budget": budget,
                "planned": planned_per_device(summary)}
    kv_type = bd.kv_type_k if bd.kv_type_k == bd.kv_type_v else None
    return LoadPlan(bd.n_ctx if chosen.get("n_ctx") is None else int(chosen["n_ctx"]), kv_type,
                    bd.flash_attn, placement, summary)


def _fit_params(info: ModelInfo, chosen: dict[str, Any], extra_host_mib: float) -> fit.FitParams:
    layers = chosen.get("n_gpu_layers")
    return fit.FitParams(
        n_ctx=chosen.get("n_ctx"),
        kv_type_k=chosen.get("kv_type"),
        kv_type_v=chosen.get("kv_type"),
        flash_attn=FLASH_MODES[chosen.get("flash_attn")],
        gpu_layers=info.n_layer + 1 if layers == -1 else layers,
        extra_host_mib=extra_host_mib,
    )


def planned_per_device(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The plan's weights / KV / compute per llama.cpp device name (CPU for the host)."""
    planned: dict[str, dict[str, float]] = {}
    for device in summary.get("devices", []):
        name = device.get("device") or HOST
        planned[name] = {k: float(device.get(k, 0.0)) for k in ("weights_mib", "kv_mib", "compute_mib")}
    return planned
