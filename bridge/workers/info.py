"""What a worker tells the bridge that llama.cpp's RPC protocol cannot: which devices it serves, of
what kind (a CPU server's RPC device claims to be a GPU with the host's whole RAM), their name, memory
and bandwidth, and the versions that must match the bridge's."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .. import __version__

INFO_PATH = "/worker"


def info_port(rpc_port: int) -> int:
    """The HTTP endpoint listens on the port after the RPC port, so one address names a worker."""
    return rpc_port + 1


@dataclass
class WorkerDevice:
    name: str  # llama.cpp's name on the worker (CUDA0, CPU)
    description: str  # e.g. "NVIDIA GeForce RTX 3060" or the CPU model
    kind: str  # "gpu" or "cpu"
    total_mib: int
    free_mib: int  # what the worker offers: free VRAM, or available RAM capped by --memory
    bandwidth_gbs: float | None = None


@dataclass
class WorkerInfo:
    version: str  # st-bridge's
    llama_cpp_version: str
    rpc_port: int
    devices: list[WorkerDevice] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerInfo:
        devices = [WorkerDevice(**{k: d[k] for k in WorkerDevice.__dataclass_fields__ if k in d})
                   for d in data.get("devices", [])]
        return cls(str(data["version"]), str(data["llama_cpp_version"]), int(data["rpc_port"]), devices)


def own_versions() -> tuple[str, str]:
    import llama_cpp

    return __version__, llama_cpp.__version__


def local_info(rpc_port: int, served: list[str], memory_mib: int | None) -> WorkerInfo:
    """This machine's devices that the RPC server serves, measured (GPU figures from llama.cpp's device
    list and NVML, matched by llama.cpp's device name)."""
    from ..hardware import probe

    report = probe()
    version, llama_version = own_versions()
    devices = []
    local = [g for g in report.gpus if not g.rpc_endpoint]
    named = {g.device: g for g in local if g.device}  # llama.cpp's own names (CUDA0, MTL0, Vulkan0)
    unnamed = [g for g in local if not g.device]  # NVML's alone, in order, when the device list failed
    for name in served:
        if name.startswith("CPU"):
            total, free = _lent(report.ram_total_mib, report.ram_available_mib, memory_mib)
            devices.append(WorkerDevice(name, report.cpu.model, "cpu", total, free, report.cpu_bandwidth_gbs))
            continue
        gpu = named.get(name) or (unnamed.pop(0) if unnamed else None)
        total, free = _lent(gpu.total_mib if gpu else 0, gpu.free_mib if gpu else 0, memory_mib)
        devices.append(WorkerDevice(name, gpu.name if gpu else name, "gpu", total, free,
                                    gpu.bandwidth_gbs if gpu else None))
    return WorkerInfo(version, llama_version, rpc_port, devices)


def _lent(total: int, free: int, memory_mib: int | None) -> tuple[int, int]:
    """With `--memory N` the device is N MiB as far as the bridge is concerned (its margin included)."""
    if memory_mib is None:
        return total, free
    return min(total, memory_mib), min(free, memory_mib)
