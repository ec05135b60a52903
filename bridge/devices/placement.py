"""The planner's placement, in the form llama.cpp takes it.

A `DevicePlacement` travels in the load spec to the engine worker, which turns it into
`llama_model_params` (`model_params`): the devices to use (an explicit, NULL-terminated list, so a
CPU-only plan gives llama.cpp no GPU at all: no model, KV or compute buffer lands on one), the layers of
each device as `tensor_split` (layer counts reproduce llama.cpp's split exactly), and the routed experts
kept in host memory as tensor buffer-type overrides, the ones llama.cpp's `--cpu-moe` / `--n-cpu-moe`
create. llama-cpp-python 0.3.36 declares those fields without helpers; the structures are built here.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import asdict, dataclass, field
from typing import Any

# llama.cpp's LLM_FFN_EXPS_REGEX (common/common.h): the routed experts of a block.
EXPERTS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


@dataclass
class DevicePlacement:
    """Where each part of the model goes. `devices` are llama.cpp device names (CUDA0, RPC0, Vulkan0 ...)
    in the order layers are laid out; `layers[i]` is how many of the offloaded layers go to devices[i],
    the output layer counting as one (on the last device). An empty list runs on the CPU alone."""

    devices: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    cpu_moe: bool = False  # every block's routed experts in host memory
    n_cpu_moe: int = 0  # the routed experts of the first N blocks in host memory
    rpc_servers: list[str] = field(default_factory=list)  # host:port, registered before loading

    def __post_init__(self) -> None:
        if len(self.devices) != len(self.layers):
            raise ValueError("a placement needs one layer count per device")

    @property
    def n_gpu_layers(self) -> int:
        return sum(self.layers)

    @property
    def cpu_only(self) -> bool:
        return not self.devices or self.n_gpu_layers == 0

    def expert_patterns(self, n_layer: int) -> list[str]:
        if self.cpu_moe:
            return [EXPERTS_REGEX]
        return [rf"blk\.{i}{EXPERTS_REGEX}" for i in range(min(self.n_cpu_moe, n_layer))]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _BuftOverride(C.Structure):
    _fields_ = [("pattern", C.c_char_p), ("buft", C.c_void_p)]


def model_params(params: Any, placement: DevicePlacement, n_layer: int) -> list[Any]:
    """Fill `params` (a llama_model_params) from the placement. Returns the ctypes objects llama.cpp
    points into; the caller keeps them alive until the model is loaded."""
    import llama_cpp

    from . import ggml

    for endpoint in placement.rpc_servers:
        ggml.add_rpc_server(endpoint)
    devices = [] if placement.cpu_only else placement.devices
    handles = [ggml.device_handle(name) for name in devices]
    device_array = (C.c_void_p * (len(handles) + 1))(*handles, None)
    params.devices = C.cast(device_array, C.c_void_p).value
    params.n_gpu_layers = placement.n_gpu_layers if devices else 0
    params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER
    params.main_gpu = 0
    split = (C.c_float * llama_cpp.llama_max_devices())(*[float(n) for n in placement.layers[:len(devices)]])
    params.tensor_split = split
    keep: list[Any] = [device_array, split]
    patterns = [p.encode() for p in placement.expert_patterns(n_layer)] if devices else []
    if patterns:
        cpu = ggml.cpu_buffer_type()
        overrides = (_BuftOverride * (len(patterns) + 1))(*[_BuftOverride(p, cpu) for p in patterns],
                                                          _BuftOverride(None, None))
        params.tensor_buft_overrides = C.cast(overrides, C.c_void_p).value
        keep += [overrides, patterns]
    return keep
