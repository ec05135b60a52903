"""What llama.cpp really allocated on each device, read from its load log, beside what was planned.

llama.cpp logs every buffer it creates: model weights per buffer type (`CUDA0`, `RPC0[host:port]`,
`CPU_Mapped`, `CPU_REPACK` ...), the KV cache per device, the compute buffer per backend, and at debug
level the device of each layer. Buffer names map to devices: a bracketed endpoint and the host-side
suffixes (`_Mapped`, `_REPACK`, `_Host`) fold into the device that holds the memory; pinned `*_Host` and
every `CPU*` buffer are host RAM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

HOST = "CPU"
TOLERANCE_FRACTION = 0.05
TOLERANCE_MIB = 64.0

_BUFFER_RE = re.compile(r"(\S+) +(model|KV|compute|output) buffer size = +([\d.]+) MiB")
_LAYER_RE = re.compile(r"layer +(\d+) assigned to device (\S+?),")
_METAL_SUFFIX_RE = re.compile(r"_(Mapped|Private)$")
_KIND_FIELD = {"model": "weights_mib", "KV": "kv_mib", "compute": "compute_mib", "output": "compute_mib"}


def device_of(buffer_name: str, aliases: dict[str, str] | None = None) -> str:
    """CUDA0 -> CUDA0, CPU_Mapped / CPU_REPACK / CUDA_Host -> CPU, MTL0_Mapped / MTL0_Private -> MTL0
    (Metal's buffer types of one device, ggml-metal.cpp: with unified memory the mapped file is the GPU's
    weights). An RPC buffer is named after the device's index on its server and the server
    (`RPC0[127.0.0.1:50053]`), which `aliases` maps to the device name in this process (RPC1); without an
    alias the name before the bracket is kept."""
    if aliases and buffer_name in aliases:
        return aliases[buffer_name]
    name = buffer_name.split("[", 1)[0]
    if name.startswith("CPU") or name.endswith("_Host"):
        return HOST
    return _METAL_SUFFIX_RE.sub("", name)


@dataclass
class DeviceUse:
    weights_mib: float = 0.0
    kv_mib: float = 0.0
    compute_mib: float = 0.0

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.kv_mib + self.compute_mib

    def to_dict(self) -> dict[str, float]:
        return {"weights_mib": round(self.weights_mib, 1), "kv_mib": round(self.kv_mib, 1),
                "compute_mib": round(self.compute_mib, 1), "total_mib": round(self.total_mib, 1)}


@dataclass
class Allocation:
    """llama.cpp's buffers per device and the device of each layer (n_layer = the output layer)."""

    devices: dict[str, DeviceUse] = field(default_factory=dict)
    layer_device: dict[int, str] = field(default_factory=dict)
    buffers: dict[str, float] = field(default_factory=dict)  # raw buffer name -> MiB, as logged

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Allocation:
        """Back from `to_dict` (what the worker reports); layer devices are not kept there."""
        devices = {name: DeviceUse(float(u.get("weights_mib", 0)), float(u.get("kv_mib", 0)),
                                   float(u.get("compute_mib", 0)))
                   for name, u in data.get("devices", {}).items()}
        return cls(devices=devices, buffers=dict(data.get("buffers", {})))

    def layers_on(self, device: str) -> int:
        return sum(1 for d in self.layer_device.values() if d == device)

    def to_dict(self) -> dict[str, Any]:
        return {"devices": {name: use.to_dict() for name, use in self.devices.items()},
                "layers": {name: self.layers_on(name) for name in sorted(set(self.layer_device.values()))},
                "buffers": {name: round(v, 2) for name, v in self.buffers.items()}}


def rpc_buffer_aliases(devices: list[Any]) -> dict[str, str]:
    """Buffer names of RPC devices -> device names: the n-th device of a server is `RPC<n>[host:port]`."""
    aliases, per_server = {}, {}  # type: ignore[var-annotated]
    for device in devices:
        if device.is_rpc:
            local = per_server.get(device.description, 0)
            per_server[device.description] = local + 1
            aliases[f"RPC{local}[{device.description}]"] = device.name
    return aliases


def parse_load_log(lines: list[str], aliases: dict[str, str] | None = None) -> Allocation:
    found = Allocation()
    for line in lines:
        if m := _LAYER_RE.search(line):
            found.layer_device[int(m[1])] = m[2]
        elif m := _BUFFER_RE.search(line):
            name, kind, size = m[1], m[2], float(m[3])
            use = found.devices.setdefault(device_of(name, aliases), DeviceUse())
            setattr(use, _KIND_FIELD[kind], getattr(use, _KIND_FIELD[kind]) + size)
            key = f"{name} {kind}"
            found.buffers[key] = found.buffers.get(key, 0.0) + size
    return found


@dataclass
class Difference:
    device: str
    part: str  # weights | kv | compute
    planned_mib: float
    actual_mib: float

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "part": self.part, "planned_mib": round(self.planned_mib, 1),
                "actual_mib": round(self.actual_mib, 1)}

    def __str__(self) -> str:
        return (f"{self.device} {self.part}: planned {self.planned_mib:.1f} MiB, "
                f"llama.cpp allocated {self.actual_mib:.1f} MiB")


def within(planned: float, actual: float) -> bool:
    return abs(actual - planned) <= max(TOLERANCE_MIB, TOLERANCE_FRACTION * max(planned, actual))


def compare(planned: dict[str, dict[str, float]], actual: Allocation) -> list[Difference]:
    """Differences beyond 5% or 64 MiB, per device and part. `planned` maps llama.cpp device names (CPU
    for the host) to the planner's weights/kv/compute MiB. A device that received buffers without being
    planned is a difference of its own. Host weights are left out: llama.cpp maps a file range that can
    include tensors it then copies elsewhere (repacking), so its mapped size is not the host's share."""
    found: list[Difference] = []
    for device in sorted(set(planned) | set(actual.devices)):
        plan = planned.get(device, {})
        use = actual.devices.get(device, DeviceUse())
        for part in ("weights", "kv", "compute"):
            if device == HOST and part == "weights":
                continue
            p, a = float(plan.get(f"{part}_mib", 0.0)), getattr(use, f"{part}_mib")
            if not within(p, a):
                found.append(Difference(device, part, p, a))
    return found
