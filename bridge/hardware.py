"""Hardware probe: CPU, RAM, swap, the GPUs this llama.cpp build can use, NVIDIA GPUs (NVML), Docker.

Never fails: a machine without a GPU, without the NVML library, or with an NVML error still gets a
correct report that says so (in `nvml_error`).

The GPUs come from llama.cpp's own device list (bridge.devices.local): whatever the build can use,
CUDA, Metal, Vulkan or ROCm, under the name llama.cpp gives it (CUDA0, MTL0, Vulkan0 ...). NVML adds
what it knows to the NVIDIA ones, matched by PCI bus id: fresh free memory, driver, compute capability,
bandwidth, and later the memory of each process. An NVIDIA GPU the build cannot use is still reported,
with the way to a build that can.

What talks to the outside world is a parameter of `probe()`, so that tests can stand in for it at its
boundary: `nvml` (the `pynvml` module of the nvidia-ml-py package), `llama` (the `llama_cpp` module)
and `devices` (what llama.cpp's device API answers). All default to the real thing.

GPU memory bandwidth is computed from NVML's answers, not looked up in a table:

    bandwidth_GB/s = max_memory_clock_MHz x 2 x bus_width_bits / 8 / 1000

NVML reports the memory clock at half the data rate for GDDR6, GDDR6X and HBM alike, hence the x 2.
Checked against the makers' figures: RTX 3090 (9751 MHz, 384 bit) 936 GB/s; RTX 4090 (10501 MHz,
384 bit) 1008 GB/s; RTX 3080 (9501 MHz, 320 bit) 760 GB/s; A100 40 GB (1215 MHz, 5120 bit) 1555 GB/s;
H100 PCIe (1593 MHz, 5120 bit) 2039 GB/s; H100 SXM (2619 MHz, 5120 bit) 3352 GB/s.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from . import install_hint
from .devices.ggml import Device
from .devices.local import (
    METAL_BACKENDS,
    REFRESH_S,
    LocalDevices,
    apple_bandwidth,
    is_metal,
    is_unified,
    local_devices,
    local_gpus,
    normal_bus_id,
)
from .errors import BadRequest

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# CPU RAM bandwidth is not measurable without a benchmark, so it is estimated from the core count: a
# conservative DDR4-3200 figure per 64-bit channel (25.6 GB/s), with 2 channels for desktops and
# laptops (up to 16 physical cores), 4 for workstations (up to 32) and 8 for servers. DDR5 desktops
# reach 60-90 GB/s, so speed estimates built on this err on the slow side.
GBS_PER_CHANNEL = 25.6


@dataclass
class CPUInfo:
    model: str
    cores_physical: int
    cores_logical: int
    avx2: bool
    avx512: bool


@dataclass
class GPUInfo:
    index: int
    name: str
    total_mib: int
    free_mib: int
    used_mib: int
    driver: str | None = None
    compute_capability: str | None = None  # "8.6"
    bandwidth_gbs: float | None = None  # from bus width x memory clock
    synthetic: bool = False  # made up by what_if(), not found on this machine
    device: str | None = None  # llama.cpp's name for it (CUDA0, RPC0 ...); None: not known to this build
    rpc_endpoint: str | None = None  # host:port of the RPC server that serves it
    overhead_mib: float | None = None  # what llama.cpp uses beyond its buffers (learned; None: default)
    kind: str = "gpu"  # "cpu" for a worker that lends its CPU and RAM
    rtt_ms: float | None = None  # network round trip to a remote device's machine
    backend: str | None = None  # llama.cpp's backend: CUDA, MTL (Metal), Vulkan, ROCm ...
    unified: bool = False  # its memory is the machine's RAM (Apple silicon, an integrated GPU)
    pci_bus_id: str | None = None  # "0000:01:00.0", how NVML's GPUs are matched to llama.cpp's
    bandwidth_note: str | None = None  # where `bandwidth_gbs` comes from when it is not measured

    @property
    def on_metal(self) -> bool:
        return self.backend in METAL_BACKENDS


@dataclass
class HardwareReport:
    cpu: CPUInfo
    ram_total_mib: int
    ram_available_mib: int
    swap_total_mib: int
    swap_free_mib: int
    gpus: list[GPUInfo] = field(default_factory=list)
    gpu_offload_supported: bool = False  # llama_supports_gpu_offload() of this llama-cpp-python build
    gpu_problem: str | None = None  # e.g. "an NVIDIA GPU is present but this build cannot use it"
    reinstall_command: str | None = None
    nvml_error: str | None = None
    in_docker: bool = False
    cpu_bandwidth_gbs: float | None = None  # estimated RAM bandwidth, for speed estimates
    llama_cpp_version: str | None = None  # None when llama_cpp cannot be imported
    llama_cpp_error: str | None = None  # why llama_cpp cannot be imported
    devices_error: str | None = None  # why llama.cpp's device list could not be read (NVML's GPUs then)
    hypothetical: bool = False  # made by what_if(): memory figures are the user's, not measured

    @property
    def usable_gpus(self) -> list[GPUInfo]:
        """Devices the engine can offload to: RPC servers' devices, and local GPUs when the build can use
        them. RPC devices come first, as llama.cpp orders them."""
        return [g for g in self.gpus if g.rpc_endpoint or self.gpu_offload_supported]


# --- probe -------------------------------------------------------------------------------------------

def probe(nvml: Any = None, llama: Any = None, devices: LocalDevices | None = None) -> HardwareReport:
    """Look at this machine. `nvml` and `llama` stand in for the `pynvml` and `llama_cpp` modules, `devices`
    for llama.cpp's device list (tests). A stand-in `llama` without `devices` answers for itself whether
    it can offload, and the GPUs are NVML's."""
    llama, llama_error = (llama, None) if llama is not None else _import_llama()
    ram, swap = psutil.virtual_memory(), psutil.swap_memory()
    cpu = cpu_info(llama=llama)
    ram_gbs = estimate_cpu_bandwidth(cpu.cores_physical)
    nvidia, nvml_error = nvidia_gpus(nvml)
    local = _local(nvidia, llama, devices, ram_gbs)
    report = HardwareReport(
        cpu=cpu,
        ram_total_mib=ram.total // MIB,
        ram_available_mib=ram.available // MIB,
        swap_total_mib=swap.total // MIB,
        swap_free_mib=swap.free // MIB,
        gpus=remote_gpus() + local.gpus,
        gpu_offload_supported=local.offload,
        nvml_error="; ".join(filter(None, [nvml_error, *local.notes])) or None,
        in_docker=in_docker(),
        cpu_bandwidth_gbs=ram_gbs,
        llama_cpp_version=getattr(llama, "__version__", None),
        llama_cpp_error=llama_error,
        devices_error=local.error,
    )
    _explain_gpu_problem(report)
    return report


def _is_real_module(llama: Any) -> bool:
    return isinstance(llama, ModuleType) and llama.__name__ == "llama_cpp"


@dataclass
class _Local:
    gpus: list[GPUInfo]
    offload: bool  # the build can put layers on a GPU of this machine
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _local(nvidia: list[GPUInfo], llama: Any, devices: LocalDevices | None, ram_gbs: float) -> _Local:
    """The local GPUs the build can use, from llama.cpp's device list with NVML's figures added. When that
    list cannot be read: NVML's GPUs, named CUDA<n> in NVML's order, usable if the build can offload.
    NVIDIA GPUs the build cannot use are kept (unusable), so the report can say how to fix that."""
    if llama is None:
        return _Local(nvidia, False)
    if devices is None and not _is_real_module(llama):
        return _Local(nvidia, bool(llama.llama_supports_gpu_offload()))
    source = devices or local_devices
    found = source.get()
    if found.error:
        log.warning("could not read llama.cpp's device list (%s); GPUs from NVML alone", found.error)
        return _Local(nvidia, _local_offload(llama), error=found.error)
    gpus, unmatched = _merge(local_gpus(found.devices), nvidia, ram_gbs)
    if any(g.free_from_llama for g in gpus):  # no NVML figure: llama.cpp's, read again when old
        gpus, unmatched = _merge(local_gpus(source.get(max_age_s=REFRESH_S).devices), nvidia, ram_gbs)
    if not gpus:
        return _Local(nvidia, False)
    notes = [f"NVML sees {g.name} ({g.pci_bus_id or f'GPU {g.index}'}), which llama.cpp does not list "
             "(hidden by CUDA_VISIBLE_DEVICES, or not supported by this build): left out" for g in unmatched]
    return _Local([g.info for g in gpus], True, notes=notes)


@dataclass
class _Merged:
    info: GPUInfo
    free_from_llama: bool  # its free memory is llama.cpp's figure (NVML does not know the device)


def _merge(devices: list[Device], nvidia: list[GPUInfo],
           ram_gbs: float) -> tuple[list[_Merged], list[GPUInfo]]:
    """Each of llama.cpp's GPUs with what NVML knows of it, and the NVML GPUs that matched none."""
    pairs = _pair(devices, nvidia)
    merged = [_gpu_info(i, d, None if n is None else nvidia[n], ram_gbs) for i, (d, n) in enumerate(pairs)]
    used = {n for _, n in pairs}
    return merged, [g for n, g in enumerate(nvidia) if n not in used]


def _pair(devices: list[Device], nvidia: list[GPUInfo]) -> list[tuple[Device, int | None]]:
    """Device -> NVML GPU (its position) by PCI bus id. A CUDA device left over takes the next NVML GPU
    left over where one of the two has no bus id to compare (CUDA numbers GPUs fastest first by default,
    NVML by bus id, so order alone is the last resort)."""
    by_bus = {g.pci_bus_id: n for n, g in enumerate(nvidia) if g.pci_bus_id}
    pairs = [(d, by_bus.get(normal_bus_id(d.device_id) or "")) for d in devices]
    used = {n for _, n in pairs if n is not None}
    left = [n for n in range(len(nvidia)) if n not in used]
    for i, (d, n) in enumerate(pairs):
        if n is None and d.backend == "CUDA" and left and not (d.device_id and nvidia[left[0]].pci_bus_id):
            pairs[i] = (d, left.pop(0))
    return pairs


def _gpu_info(index: int, d: Device, nvml: GPUInfo | None, ram_gbs: float) -> _Merged:
    unified = is_unified(d)
    if nvml is not None:  # NVML's figures are fresh on every probe and carry more
        return _Merged(replace(nvml, index=index, device=d.name, backend=d.backend, unified=unified), False)
    bandwidth, note = _device_bandwidth(d, unified, ram_gbs)
    return _Merged(GPUInfo(
        index=index, name=d.description or d.name, total_mib=d.total_mib, free_mib=d.free_mib,
        used_mib=max(0, d.total_mib - d.free_mib), bandwidth_gbs=bandwidth, device=d.name, backend=d.backend,
        unified=unified, pci_bus_id=normal_bus_id(d.device_id), bandwidth_note=note), True)


def _device_bandwidth(d: Device, unified: bool, ram_gbs: float) -> tuple[float | None, str | None]:
    """A device NVML does not measure: Apple's figure for an Apple chip; for another unified-memory GPU
    the RAM's, which it shares; otherwise unknown (the speed estimates then use their default)."""
    if is_metal(d) and (apple := apple_bandwidth(d.description)):
        return apple
    if unified:
        return ram_gbs, "the RAM's estimated bandwidth, which it shares"
    return None, None


def _local_offload(llama: Any) -> bool:
    """Whether this build can put layers on a GPU of this machine, when the device probe failed.
    `llama_supports_gpu_offload()` is true for any build with the RPC backend, GPU or not, so the answer
    comes from llama.cpp's device list, read here without touching a GPU's memory."""
    from .devices import ggml

    try:
        return any(d.offloads and not d.is_rpc for d in ggml.devices_without_memory())
    except (AttributeError, OSError) as exc:
        log.warning("could not list llama.cpp's devices (%s); trusting llama_supports_gpu_offload()", exc)
        return bool(llama.llama_supports_gpu_offload())


def remote_gpus() -> list[GPUInfo]:
    """Devices of other machines (workers, RPC servers) the bridge was told about (bridge.workers)."""
    from .workers.registry import registry

    return registry.gpus()


def process_gpu_mib(pid: int, nvml: Any = None, gpus: Sequence[GPUInfo] = ()) -> dict[str, float]:
    """GPU memory NVML attributes to process `pid`, per llama.cpp device name: the name of the GPU of
    `gpus` with the same PCI bus id, else CUDA<NVML's index>. {} without NVML or GPU."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception:  # no driver, no library: nothing to measure
        return {}
    names = {g.pci_bus_id: g.device for g in gpus if g.pci_bus_id and g.device and not g.rpc_endpoint}
    found: dict[str, float] = {}
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = names.get(_bus_id(nvml, handle)) if names else None
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    found[name or f"CUDA{index}"] = proc.usedGpuMemory / MIB
    except Exception as exc:  # a driver that cannot say per process (some Windows modes): no figure
        log.info("NVML per-process memory unavailable: %s", exc)
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    return found


def _import_llama() -> tuple[ModuleType | None, str | None]:
    # Imported here, not at module top: loading llama.cpp's shared library is slow and may fail.
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as exc:
        return None, f"llama-cpp-python cannot be imported: {exc}"
    return llama_cpp, None


def _explain_gpu_problem(report: HardwareReport) -> None:
    """If an NVIDIA GPU is present but this build cannot use it, say so and how to fix it."""
    if not report.gpus or report.gpu_offload_supported:
        return
    report.reinstall_command = install_hint.reinstall_command(report.gpus, report.llama_cpp_version)
    if report.llama_cpp_version is None:
        report.gpu_problem = (
            "An NVIDIA GPU is present, but llama-cpp-python cannot be imported, so no model can run. "
            "Install a build that can use the GPU:"
        )
        return
    report.gpu_problem = (
        f"An NVIDIA GPU is present, but this llama-cpp-python build ({report.llama_cpp_version}) was built "
        "without GPU support, so models run on the CPU only. Install one that can use the GPU:"
    )


# --- CPU ---------------------------------------------------------------------------------------------

def cpu_info(cpuinfo_path: Path = Path("/proc/cpuinfo"), llama: Any | None = None) -> CPUInfo:
    """Model name and ISA flags from /proc/cpuinfo (Linux), else from llama.cpp's own CPU report."""
    text = _read_text(cpuinfo_path)
    model = _cpuinfo_field(text, "model name") or platform.processor() or platform.machine() or "unknown CPU"
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    flags = set((_cpuinfo_field(text, "flags") or "").split())
    if flags:
        avx2, avx512 = "avx2" in flags, "avx512f" in flags
    else:
        avx2, avx512 = _llama_isa_flags(llama)
    return CPUInfo(model=model, cores_physical=physical, cores_logical=logical, avx2=avx2, avx512=avx512)


def _cpuinfo_field(text: str, name: str) -> str | None:
    """The first `name : value` line of /proc/cpuinfo (every core repeats the same fields)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def _llama_isa_flags(llama: Any | None) -> tuple[bool, bool]:
    """AVX2 / AVX-512 as llama.cpp reports them ("AVX2 = 1 | AVX512 = 1 | ..."); False when unknown."""
    if llama is None:
        return False, False
    info = llama.llama_print_system_info()
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    return bool(re.search(r"\bAVX2 = 1\b", text)), bool(re.search(r"\bAVX512 = 1\b", text))


def estimate_cpu_bandwidth(cores_physical: int) -> float:
    """A conservative RAM bandwidth in GB/s (see GBS_PER_CHANNEL for the heuristic)."""
    channels = 2 if cores_physical <= 16 else 4 if cores_physical <= 32 else 8
    return round(channels * GBS_PER_CHANNEL, 1)


# --- NVIDIA GPUs (NVML) ------------------------------------------------------------------------------

def nvidia_gpus(nvml: Any = None) -> tuple[list[GPUInfo], str | None]:
    """Every NVIDIA GPU NVML sees, and a note on whatever NVML could not answer (None if all went well)."""
    notes: list[str] = []
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return [], "the nvidia-ml-py package is not installed, so NVIDIA GPUs cannot be seen"
    try:
        nvml.nvmlInit()
    except Exception as exc:  # any failure of the driver library means "no GPU we can see", never a crash
        return [], _describe_nvml_error(exc)
    try:
        gpus = _read_gpus(nvml, notes)
    finally:
        _call(notes, "shutting NVML down", lambda: nvml.nvmlShutdown())
    return gpus, "; ".join(notes) or None


def _read_gpus(nvml: Any, notes: list[str]) -> list[GPUInfo]:
    count = _call(notes, "counting GPUs", lambda: nvml.nvmlDeviceGetCount())
    if not count:
        return []
    driver = _text(_call(notes, "reading the driver version", lambda: nvml.nvmlSystemGetDriverVersion()))
    gpus = []
    for index in range(count):
        gpu = _read_gpu(nvml, index, driver, notes)
        if gpu is not None:
            gpus.append(gpu)
    return gpus


def _read_gpu(nvml: Any, index: int, driver: str | None, notes: list[str]) -> GPUInfo | None:
    """One GPU; None (with a note) when even its memory cannot be read, since a plan needs it."""
    handle = _call(notes, f"GPU {index}: opening it", lambda: nvml.nvmlDeviceGetHandleByIndex(index))
    if handle is None:
        return None
    memory = _call(notes, f"GPU {index}: reading its memory (GPU left out)",
                   lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    if memory is None:
        return None
    name = _text(_call(notes, f"GPU {index}: reading its name", lambda: nvml.nvmlDeviceGetName(handle)))
    capability = _call(notes, f"GPU {index}: reading its compute capability",
                       lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle))
    pci = _call(notes, f"GPU {index}: reading its PCI bus id", lambda: nvml.nvmlDeviceGetPciInfo(handle))
    return GPUInfo(
        index=index,
        name=name or f"NVIDIA GPU {index}",
        total_mib=memory.total // MIB,
        free_mib=memory.free // MIB,
        used_mib=memory.used // MIB,
        driver=driver,
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        bandwidth_gbs=_bandwidth(nvml, handle, index, notes),
        pci_bus_id=normal_bus_id(getattr(pci, "busId", None)),
    )


def _bus_id(nvml: Any, handle: Any) -> str | None:
    try:
        return normal_bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)
    except Exception:  # an NVML error or old bindings: the GPU keeps its CUDA<index> name
        return None


def _bandwidth(nvml: Any, handle: Any, index: int, notes: list[str]) -> float | None:
    """Memory bandwidth in GB/s from bus width and max memory clock (formula in the module docstring)."""
    what = f"GPU {index}: reading its memory bandwidth"
    bus_bits = _call(notes, what, lambda: nvml.nvmlDeviceGetMemoryBusWidth(handle))
    if not bus_bits:
        return None
    clock_mhz = _call(notes, what, lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM))
    if not clock_mhz:
        return None
    return round(clock_mhz * 2 * bus_bits / 8 / 1000, 1)


def _call(notes: list[str], what: str, fn: Callable[[], Any]) -> Any:
    """One NVML call (a lambda, so a name missing from old bindings fails inside the try too).

    On any failure: a note and None. Only the library call sits inside the try.
    """
    try:
        return fn()
    except Exception as exc:  # NVML raises NVMLError subclasses, old bindings AttributeError; none may crash
        notes.append(f"{what} failed: {_describe_nvml_error(exc)}")
        return None


def _describe_nvml_error(exc: Exception) -> str:
    kind = type(exc).__name__
    if kind == "NVMLError_LibraryNotFound":
        return "the NVIDIA driver library (NVML) is not installed, so there is no usable NVIDIA GPU"
    if kind == "NVMLError_DriverNotLoaded":
        return "the NVIDIA driver is installed but not loaded"
    if kind == "NVMLError_NoPermission":
        return "no permission to query the NVIDIA driver"
    return f"NVML error: {exc}"


def _text(value: Any) -> str | None:
    """NVML strings are bytes in older bindings and str in newer ones."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


# --- Docker ------------------------------------------------------------------------------------------

def in_docker(root: Path = Path("/")) -> bool:
    """Whether this process runs in a container (Docker, Podman, containerd, Kubernetes)."""
    if (root / ".dockerenv").exists() or (root / "run/.containerenv").exists():
        return True
    cgroup = _read_text(root / "proc/1/cgroup")
    if any(word in cgroup for word in ("docker", "containerd", "kubepods", "libpod")):
        return True
    return _root_is_overlay(_read_text(root / "proc/self/mountinfo"))


def _root_is_overlay(mountinfo: str) -> bool:
    """mountinfo lines: `id parent dev root mountpoint options [tags] - fstype source superoptions`."""
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts = fields.split()
        if len(parts) >= 5 and parts[4] == "/" and tail.split()[:1] == ["overlay"]:
            return True
    return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:  # not Linux, or not readable: the caller treats it as "nothing there"
        return ""


# --- what if -----------------------------------------------------------------------------------------

def what_if(report: HardwareReport, gpu_mib: list[int] | None, ram_mib: int | None) -> HardwareReport:
    """A copy with the free memory the user asks about: "what if my machine had this much free".

    `gpu_mib` lists the free MiB of each GPU (`[0]`: no GPU). Entries beyond the GPUs found become
    synthetic GPUs "GPU1", "GPU2"...; a GPU left out of the list is left out of the copy. Any GPU named
    is assumed usable by the build. `ram_mib` replaces the available RAM. None keeps the measured value.
    """
    result = copy.deepcopy(report)
    result.hypothetical = True
    if ram_mib is not None:
        _check_mib("--ram-mib", ram_mib)
        result.ram_available_mib = ram_mib
        result.ram_total_mib = max(result.ram_total_mib, ram_mib)
    if gpu_mib is None:
        return result
    for mib in gpu_mib:
        _check_mib("--gpu-mib", mib)
    if not any(gpu_mib):
        result.gpus = []
        return result
    result.gpus = [_gpu_with_free(report.gpus, index, mib) for index, mib in enumerate(gpu_mib)]
    result.gpu_offload_supported = True
    return result


def _gpu_with_free(found: list[GPUInfo], index: int, free_mib: int) -> GPUInfo:
    if index >= len(found):
        return GPUInfo(index=index, name=f"GPU{index}", total_mib=free_mib, free_mib=free_mib, used_mib=0,
                       synthetic=True)
    gpu = copy.copy(found[index])
    gpu.index = index
    gpu.free_mib = free_mib
    gpu.total_mib = max(gpu.total_mib, free_mib)
    gpu.used_mib = gpu.total_mib - free_mib
    return gpu


def _check_mib(flag: str, value: int) -> None:
    if value < 0:
        raise BadRequest(f"{flag} must be a number of MiB, 0 or more (got {value})")


# --- presentation ------------------------------------------------------------------------------------

def report_to_dict(report: HardwareReport) -> dict[str, Any]:
    """The report as plain JSON-ready data, with the one-line summary and the usable GPU count."""
    data = asdict(report)
    data["usable_gpu_count"] = len(report.usable_gpus)
    data["summary"] = summary_line(report)
    return data


def summary_line(report: HardwareReport) -> str:
    """E.g. "RTX 3080 10 GB (9.2 GB free) · 31 GB RAM (21 GB free) · 8 cores AVX2"."""
    ram = f"{gb(report.ram_total_mib)} RAM ({gb(report.ram_available_mib)} free)"
    return " · ".join([_gpus_summary(report), ram, _cpu_summary(report.cpu)])


def _gpus_summary(report: HardwareReport) -> str:
    if not report.gpus:
        return "No GPU"
    text = " + ".join(
        f"{short_gpu_name(gpu.name)} {gb(gpu.total_mib)}{' of RAM' if gpu.unified else ''}"
        f" ({gb(gpu.free_mib)} free)" for gpu in report.gpus
    )
    if not report.gpu_offload_supported:
        text += ", not usable by this llama-cpp-python build"
    return text


def _cpu_summary(cpu: CPUInfo) -> str:
    isa = "AVX-512" if cpu.avx512 else "AVX2" if cpu.avx2 else "no AVX2"
    return f"{cpu.cores_physical} cores {isa}"


def short_gpu_name(name: str) -> str:
    """ "NVIDIA GeForce RTX 3080" -> "RTX 3080"; "NVIDIA H100 PCIe" -> "H100 PCIe"."""
    short = re.sub(r"^(NVIDIA\s+)?(GeForce\s+)?", "", name).strip()
    return short or name


def gb(mib: int) -> str:
    """MiB as a short GB figure: one decimal below 10 GB ("9.2 GB"), whole above ("21 GB")."""
    value = mib / 1024
    if value >= 10:
        return f"{round(value)} GB"
    return f"{value:.1f}".removesuffix(".0") + " GB"


def report_lines(report: HardwareReport) -> list[str]:
    """The report as readable lines for a terminal, in the order a person checks things."""
    cpu = report.cpu
    lines = [
        summary_line(report),
        "",
        f"CPU        {cpu.model} · {cpu.cores_physical} cores, {cpu.cores_logical} threads"
        f" · AVX2 {_yes(cpu.avx2)} · AVX-512 {_yes(cpu.avx512)}",
        f"RAM        {report.ram_total_mib} MiB total, {report.ram_available_mib} MiB available",
        f"Swap       {report.swap_total_mib} MiB total, {report.swap_free_mib} MiB free",
        f"RAM speed  about {report.cpu_bandwidth_gbs:g} GB/s (an estimate from the core count)",
    ]
    lines += _gpu_lines(report)
    lines.append(f"llama.cpp  {_llama_line(report)}")
    if report.gpu_problem:
        lines += [f"Problem    {report.gpu_problem}", *install_hint.fix_lines(report)]
    if report.nvml_error and report.gpus:
        lines.append(f"NVML       {report.nvml_error}")
    if report.devices_error:
        lines.append(f"Devices    llama.cpp's device list could not be read ({report.devices_error}); "
                     "GPUs from NVML alone")
    if report.in_docker:
        lines.append("Container  yes (Docker or similar)")
    if report.hypothetical:
        lines.append("Note       free memory figures are the ones asked for, not measured")
    return lines


def _gpu_lines(report: HardwareReport) -> list[str]:
    if not report.gpus:
        lines = ["GPU        No GPU this llama.cpp build can use: models run on the CPU."]
        if report.nvml_error:
            lines.append(f"           ({report.nvml_error})")
        if report.in_docker:
            lines.append("           In a container, a GPU needs `docker run --gpus all` and the NVIDIA"
                         " Container Toolkit.")
        return lines
    lines = []
    for gpu in report.gpus:
        lines += [
            f"GPU {gpu.index:<6} {gpu.name} · {gpu.total_mib} MiB total, {gpu.free_mib} MiB free,"
            f" {gpu.used_mib} MiB used",
            f"           {' · '.join(_gpu_details(gpu))}",
        ]
        if gpu.unified:
            limit = " (total: the working-set limit Metal recommends)" if gpu.on_metal else ""
            lines.append(f"           unified memory: what it holds comes out of the RAM{limit}")
    return lines


def _gpu_details(gpu: GPUInfo) -> list[str]:
    details = [f"llama.cpp device {gpu.device}"] if gpu.device and not gpu.rpc_endpoint else []
    if gpu.compute_capability or not gpu.backend or gpu.backend == "CUDA":
        details.append(f"compute capability {gpu.compute_capability or 'unknown'}")
    if gpu.bandwidth_gbs:
        note = f" ({gpu.bandwidth_note})" if gpu.bandwidth_note else ""
        details.append(f"{gpu.bandwidth_gbs:g} GB/s{note}")
    else:
        details.append("bandwidth unknown")
    if gpu.driver:
        details.append(f"driver {gpu.driver}")
    return details


def _llama_line(report: HardwareReport) -> str:
    if report.llama_cpp_version is None:
        return report.llama_cpp_error or "llama-cpp-python is not available"
    build = "can offload to a GPU" if report.gpu_offload_supported else "CPU-only build (cannot use a GPU)"
    if report.hypothetical and report.gpu_offload_supported:
        build = "GPU offload assumed for this what-if"
    return f"llama-cpp-python {report.llama_cpp_version}, {build}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
