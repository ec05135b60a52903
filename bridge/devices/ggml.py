"""ctypes bindings to llama.cpp's device registry (`ggml_backend_dev_*`, `ggml_backend_reg_*`).

llama-cpp-python 0.3.36 declares none of them. They are bound on the `libggml` that `libllama` itself
links against: with two copies of ggml in one process, devices registered in one are invisible to the
other. Import this module only in processes that may hold a GPU context or an RPC connection (the engine
worker, the device probe, the RPC server), never in the HTTP server.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

MIB = 1 << 20
# enum ggml_backend_dev_type
DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
CPU_KIND = 0


class RPCUnavailable(Exception):
    """This llama.cpp build has no RPC backend, or an RPC server exposes no device."""


class _Caps(C.Structure):
    _fields_ = [("async_", C.c_bool), ("host_buffer", C.c_bool), ("buffer_from_host_ptr", C.c_bool),
                ("events", C.c_bool), ("mmap_support", C.c_bool)]


class _Props(C.Structure):
    _fields_ = [("name", C.c_char_p), ("description", C.c_char_p), ("memory_free", C.c_size_t),
                ("memory_total", C.c_size_t), ("type", C.c_int), ("device_id", C.c_char_p), ("caps", _Caps)]


_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "ggml_backend_load_all": ([], None),
    "ggml_backend_dev_count": ([], C.c_size_t),
    "ggml_backend_dev_get": ([C.c_size_t], C.c_void_p),
    "ggml_backend_dev_by_name": ([C.c_char_p], C.c_void_p),
    "ggml_backend_dev_by_type": ([C.c_int], C.c_void_p),
    "ggml_backend_dev_get_props": ([C.c_void_p, C.POINTER(_Props)], None),
    "ggml_backend_dev_backend_reg": ([C.c_void_p], C.c_void_p),
    "ggml_backend_dev_buffer_type": ([C.c_void_p], C.c_void_p),
    "ggml_backend_reg_name": ([C.c_void_p], C.c_char_p),
    "ggml_backend_reg_by_name": ([C.c_char_p], C.c_void_p),
    "ggml_backend_reg_get_proc_address": ([C.c_void_p, C.c_char_p], C.c_void_p),
    "ggml_backend_register": ([C.c_void_p], None),
}
_ADD_SERVER = C.CFUNCTYPE(C.c_void_p, C.c_char_p)
_START_SERVER = C.CFUNCTYPE(None, C.c_char_p, C.c_char_p, C.c_size_t, C.c_size_t, C.c_void_p)


@lru_cache(maxsize=1)
def lib() -> Any:
    import llama_cpp  # noqa: F401  (loads libllama, and with it the libggml bound below)
    from llama_cpp._ggml import libggml

    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(libggml, name)
        fn.argtypes, fn.restype = args, res
    return libggml


@dataclass(frozen=True)
class Device:
    """One device as llama.cpp's registry reports it. `backend` is its registry's name (CUDA, Metal,
    Vulkan, RPC, CPU ...); an RPC device's `description` is its server's host:port."""

    name: str
    description: str
    kind: str  # cpu | gpu | igpu | accel
    backend: str
    free_mib: int
    total_mib: int
    device_id: str | None = None  # PCI bus id where the backend knows it

    @property
    def is_rpc(self) -> bool:
        return self.backend == "RPC"

    @property
    def offloads(self) -> bool:
        """A device llama.cpp places layers on (the CPU and accelerators ride with the host)."""
        return self.kind in ("gpu", "igpu")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "kind": self.kind,
                "backend": self.backend, "free_mib": self.free_mib, "total_mib": self.total_mib,
                "device_id": self.device_id, "rpc": self.is_rpc}


def devices() -> list[Device]:
    """Every device registered in this process, in registry order. A GPU backend's memory query opens a
    context on that GPU: call this only in a process that may hold one."""
    g = lib()
    found = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        props = _Props()
        g.ggml_backend_dev_get_props(dev, C.byref(props))
        reg = g.ggml_backend_dev_backend_reg(dev)
        found.append(Device(
            name=_text(props.name), description=_text(props.description),
            kind=DEVICE_KINDS.get(props.type, "gpu"),
            backend=_text(g.ggml_backend_reg_name(reg)) if reg else "",
            free_mib=props.memory_free // MIB, total_mib=props.memory_total // MIB,
            device_id=props.device_id.decode() if props.device_id else None,
        ))
    return found


def devices_without_memory() -> list[Device]:
    """The registered devices by name and kind only: no memory query, so no GPU context is created.
    Safe in the HTTP server's process (memory figures read 0)."""
    g = lib()
    g.ggml_backend_dev_name.argtypes = g.ggml_backend_dev_description.argtypes = [C.c_void_p]
    g.ggml_backend_dev_name.restype = g.ggml_backend_dev_description.restype = C.c_char_p
    g.ggml_backend_dev_type.argtypes, g.ggml_backend_dev_type.restype = [C.c_void_p], C.c_int
    found = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        reg = g.ggml_backend_dev_backend_reg(dev)
        found.append(Device(name=_text(g.ggml_backend_dev_name(dev)),
                            description=_text(g.ggml_backend_dev_description(dev)),
                            kind=DEVICE_KINDS.get(g.ggml_backend_dev_type(dev), "gpu"),
                            backend=_text(g.ggml_backend_reg_name(reg)) if reg else "",
                            free_mib=0, total_mib=0))
    return found


def device_handle(name: str) -> int:
    handle = lib().ggml_backend_dev_by_name(name.encode())
    if not handle:
        raise LookupError(f"llama.cpp has no device named {name}")
    return int(handle)


def cpu_buffer_type() -> int:
    g = lib()
    return int(g.ggml_backend_dev_buffer_type(g.ggml_backend_dev_by_type(CPU_KIND)))


def supports_rpc() -> bool:
    return bool(lib().ggml_backend_reg_by_name(b"RPC"))


def _rpc_proc(name: bytes) -> int:
    g = lib()
    reg = g.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RPCUnavailable("this llama-cpp-python was built without RPC: reinstall it with "
                             'CMAKE_ARGS="-DGGML_RPC=on" (see the README, "Building with RPC")')
    address = g.ggml_backend_reg_get_proc_address(reg, name)
    if not address:
        raise RPCUnavailable(f"the RPC backend of this build lacks {name.decode()}")
    return int(address)


def add_rpc_server(endpoint: str) -> None:
    """Register the devices of the RPC server at host:port. llama.cpp aborts the process when the server
    cannot be reached or speaks another protocol version, so only a child process may call this."""
    reg = _ADD_SERVER(_rpc_proc(b"ggml_backend_rpc_add_server"))(endpoint.encode())
    if not reg:
        raise RPCUnavailable(f"the RPC server at {endpoint} exposes no device")
    lib().ggml_backend_register(reg)


def start_rpc_server(endpoint: str, n_threads: int, device_names: list[str], cache_dir: str | None) -> None:
    """Serve these devices over llama.cpp's RPC protocol; blocks for good (stop it with a signal)."""
    handles = [device_handle(n) for n in device_names]
    array = (C.c_void_p * (len(handles) + 1))(*handles, None)
    start = _START_SERVER(_rpc_proc(b"ggml_backend_rpc_start_server"))
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, len(handles),
          C.cast(array, C.c_void_p))


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", errors="replace") if value else ""
