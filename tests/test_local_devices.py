"""GPUs from llama.cpp's own device list: Metal with unified memory, Vulkan, ROCm and CUDA alike, NVML's
figures added to NVIDIA GPUs by PCI bus id, and the plans made for them.

llama.cpp's answers are substituted where the bridge reads them: the reader of `LocalDevices`, which on a
real machine runs llama.cpp's device API in a child process. NVML's answers come from FakeNVML
(tests/test_hardware.py); RAM figures are set on the report as psutil would give them on that machine. The
probe, the planner and the placement are the real ones. No Mac, AMD GPU or Vulkan device was available to
check these answers against.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pynvml
import pytest

from bridge import fit, hardware
from bridge.devices import ggml
from bridge.devices.ggml import Device
from bridge.devices.inventory import Inventory
from bridge.devices.local import REFRESH_S, RETRY_S, LocalDevices, local_devices
from bridge.fit import FitParams, ModelLayout
from bridge.gguf import read_file
from bridge.hardware import HardwareReport, probe, summary_line
from tests.test_hardware import RTX_3080, RTX_3090, FakeNVML

MIB = 1 << 20
CPU = Device("CPU", "Apple M1 Max", "cpu", "CPU", 32768, 32768)
# A 32 GB M1 Max as this llama.cpp's Metal backend reports it: total = recommendedMaxWorkingSetSize
# (22906.50 MB = 21845 MiB, two thirds of 32 GiB, in a real M1 Max log), free = that less what the asking
# process allocated.
M1_MAX = Device("MTL0", "Apple M1 Max", "gpu", "MTL", 21845, 21845)
RX_7900_XTX = Device("Vulkan0", "AMD Radeon RX 7900 XTX (RADV NAVI31)", "gpu", "Vulkan", 23500, 24560,
                     "0000:03:00.0")
ROCM_7900_XTX = Device("ROCm0", "AMD Radeon RX 7900 XTX", "gpu", "ROCm", 23500, 24560, "0000:03:00.0")
# CUDA numbers GPUs fastest first: the 3090 (bus 2b) is CUDA0, though NVML lists the 3080 (bus 01) first.
CUDA_3090 = Device("CUDA0", "NVIDIA GeForce RTX 3090", "gpu", "CUDA", 23000, 24576, "0000:2b:00.0")
CUDA_3080 = Device("CUDA1", "NVIDIA GeForce RTX 3080", "gpu", "CUDA", 9000, 10240, "0000:01:00.0")
NO_NVML = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND


def stand_in_llama() -> SimpleNamespace:
    return SimpleNamespace(__version__="0.3.36", llama_supports_gpu_offload=lambda: True,
                           llama_print_system_info=lambda: b"CPU : NEON = 1 | ")


def answers(*devices: Device) -> LocalDevices:
    """llama.cpp's device list as its device API answers it, the host's CPU first."""
    return LocalDevices(read=lambda: Inventory([CPU, *devices]))


def machine(*devices: Device, nvml: FakeNVML | None = None, ram_mib: int = 65536,
            available_mib: int | None = None) -> HardwareReport:
    nvml = nvml or FakeNVML([], init_error=NO_NVML)
    report = probe(nvml=nvml, llama=stand_in_llama(), devices=answers(*devices))
    report.ram_total_mib = ram_mib
    report.ram_available_mib = available_mib if available_mib is not None else ram_mib * 3 // 4
    return report


def mac(available_mib: int = 26000) -> HardwareReport:
    """A 32 GB Mac with an M1 Max."""
    return machine(M1_MAX, ram_mib=32768, available_mib=available_mib)


@pytest.fixture(scope="module")
def layouts(sparse_model) -> Callable[[str], ModelLayout]:
    cache: dict[str, ModelLayout] = {}

    def get(key: str) -> ModelLayout:
        if key not in cache:
            cache[key] = ModelLayout.from_header(read_file(sparse_model(key)))
        return cache[key]

    return get


# --- Metal: unified memory ---------------------------------------------------------------------------

def test_a_macs_gpu_comes_from_metal_with_unified_memory() -> None:
    report = mac()
    [gpu] = report.usable_gpus
    assert report.gpu_offload_supported and report.gpu_problem is None
    assert (gpu.device, gpu.backend, gpu.unified, gpu.name) == ("MTL0", "MTL", True, "Apple M1 Max")
    assert (gpu.total_mib, gpu.free_mib) == (21845, 21845)
    assert gpu.bandwidth_gbs == 400.0 and "Apple's published figure for the M1 Max" in gpu.bandwidth_note
    assert fit.gpu_overhead_mib(gpu) == 0.0  # no CUDA context on Metal
    assert summary_line(report).startswith("Apple M1 Max 21 GB of RAM (21 GB free) · 32 GB RAM")
    assert any("unified memory" in line for line in hardware.report_lines(report))


def test_a_model_in_the_working_set_runs_fully_on_the_gpu_counted_once_in_ram(layouts) -> None:
    model = layouts("llama31-8b")
    f16 = FitParams(n_ctx=8192, kv_type_k="f16", kv_type_v="f16")  # a q8_0 cache would make room
    p = fit.plan(model, mac(), f16)
    assert p.verdict == "full_gpu", p.reason
    assert p.placement().devices == ["MTL0"] and p.placement().layers == [33]
    bd, budget = p.breakdown, p.budget
    gpu = bd.gpus[0]
    assert gpu.overhead_mib == 0.0
    assert budget.ram_need(bd) == pytest.approx(bd.host.total_mib + gpu.total_mib)
    # RAM for exactly that, and a little over or under: the GPU's bytes count against the RAM once.
    reserve = max(fit.RAM_MARGIN_MIN_MIB, fit.RAM_MARGIN_FRACTION * 32768)
    need = budget.ram_need(bd)
    enough = fit.plan(model, mac(round(need + reserve + 64)), f16)
    assert enough.verdict == "full_gpu", enough.reason
    short = fit.plan(model, mac(round(need + reserve - 64)), f16)
    assert short.verdict != "full_gpu"
    assert short.budget.gpu_usable[0] == short.budget.ram_usable  # below the working set: the RAM caps it


def test_a_model_bigger_than_the_working_set_is_partly_on_the_gpu(layouts) -> None:
    """Mixtral 8x7B (25 GB of weights) on the 32 GB Mac: more than Metal's 21 GB working set, not the RAM."""
    report = mac(available_mib=30000)
    p = fit.plan(layouts("mixtral-8x7b"), report, FitParams(n_ctx=4096))
    assert p.verdict == "partial_gpu", p.reason
    bd, budget = p.breakdown, p.budget
    assert bd.gpus[0].total_mib <= 21845 - fit.device_margin_mib(report.gpus[0])
    assert budget.ram_need(bd) <= budget.ram_usable
    assert bd.host.weights_mib > 0 and p.placement().devices == ["MTL0"]
    assert "Apple M1 Max" in p.reason


METAL_LOAD_LOG = """\
load_tensors: layer  32 assigned to device MTL0, is_swa = 0
load_tensors:   CPU_Mapped model buffer size =   281.81 MiB
load_tensors:  MTL0_Mapped model buffer size =  4155.99 MiB
llama_kv_cache:       MTL0 KV buffer size =  1024.00 MiB
sched_reserve:       MTL0 compute buffer size =   258.50 MiB
sched_reserve:        CPU compute buffer size =    24.01 MiB
"""


def test_metals_buffers_are_the_devices_own() -> None:
    """Buffer type names as this llama.cpp's Metal backend gives them (ggml-metal.cpp): the mapped weights
    of a unified-memory GPU are its own, not the host's."""
    from bridge.devices.actual import parse_load_log

    found = parse_load_log(METAL_LOAD_LOG.splitlines())
    assert set(found.devices) == {"MTL0", "CPU"} and found.layers_on("MTL0") == 1
    assert found.devices["MTL0"].total_mib == pytest.approx(4155.99 + 1024 + 258.5)


def test_a_discrete_gpu_on_metal_is_not_unified() -> None:
    radeon = Device("MTL0", "AMD Radeon Pro 5500M", "gpu", "MTL", 8176, 8176)
    [gpu] = machine(radeon).usable_gpus
    assert not gpu.unified and gpu.bandwidth_gbs is None


@pytest.mark.parametrize(("description", "gbs", "estimate"), [
    ("Apple M1", 68.25, False), ("Apple M2 Ultra", 800.0, False), ("Apple M3 Pro", 150.0, False),
    ("Apple M4 Max", 410.0, False), ("Apple M7 Max", 300.0, True),
])
def test_apple_chips_get_apples_bandwidth(description: str, gbs: float, estimate: bool) -> None:
    [gpu] = machine(Device("MTL0", description, "gpu", "MTL", 10000, 10000)).usable_gpus
    assert gpu.bandwidth_gbs == gbs
    assert ("estimate" in gpu.bandwidth_note) == estimate


# --- Vulkan and ROCm: GPUs like CUDA ones -------------------------------------------------------------

@pytest.mark.parametrize("device", [RX_7900_XTX, ROCM_7900_XTX], ids=["vulkan", "rocm"])
def test_vulkan_and_rocm_gpus_get_layers(layouts, device: Device) -> None:
    report = machine(device, nvml=FakeNVML([]))
    [gpu] = report.usable_gpus
    assert (gpu.device, gpu.backend, gpu.unified, gpu.free_mib) == (device.name, device.backend, False, 23500)
    assert gpu.pci_bus_id == "0000:03:00.0" and gpu.driver is None  # NVML knows no AMD GPU
    full = fit.plan(layouts("llama31-8b"), report, FitParams(n_ctx=8192))
    assert full.verdict == "full_gpu" and full.placement().devices == [device.name]
    assert full.breakdown.gpus[0].overhead_mib == fit.CUDA_CONTEXT_MIB  # the default, not measured for them
    part = fit.plan(layouts("mixtral-8x7b"), report, FitParams(n_ctx=4096))
    assert part.verdict == "partial_gpu" and part.placement().devices == [device.name]
    assert not part.budget.unified[0]
    assert part.budget.ram_need(part.breakdown) == part.breakdown.host.total_mib


def test_an_integrated_gpu_shares_the_ram_and_its_bandwidth() -> None:
    igpu = Device("Vulkan0", "AMD Radeon 780M (RADV GFX1103_R1)", "igpu", "Vulkan", 40000, 48000)
    report = machine(igpu)
    [gpu] = report.usable_gpus
    assert gpu.unified and gpu.bandwidth_gbs == report.cpu_bandwidth_gbs
    assert fit.budget_for(report).unified == [True]


def test_one_gpu_listed_by_two_backends_counts_once_and_integrated_ones_give_way() -> None:
    vulkan_view = Device("Vulkan0", "NVIDIA GeForce RTX 3090", "gpu", "Vulkan", 23000, 24576, "0000:2b:00.0")
    igpu = Device("Vulkan1", "Intel(R) UHD Graphics 770", "igpu", "Vulkan", 30000, 30000, "0000:00:02.0")
    report = machine(CUDA_3090, vulkan_view, igpu)
    assert [g.device for g in report.usable_gpus] == ["CUDA0"]


# --- NVIDIA: llama.cpp's device, NVML's figures ---------------------------------------------------------

def test_nvml_figures_are_merged_by_pci_bus_id_not_by_order(layouts) -> None:
    nvml = FakeNVML([RTX_3080, RTX_3090])  # NVML order: by bus id
    report = machine(CUDA_3090, CUDA_3080, nvml=nvml)
    first, second = report.usable_gpus
    assert (first.device, first.name, first.free_mib, first.bandwidth_gbs) == (
        "CUDA0", "NVIDIA GeForce RTX 3090", 23800, 936.1)  # NVML's fresh free memory, not llama.cpp's 23000
    assert (second.device, second.name, second.free_mib) == ("CUDA1", "NVIDIA GeForce RTX 3080", 9420)
    assert first.driver == "550.54.14" and first.compute_capability == "8.6"
    p = fit.plan(layouts("mixtral-8x7b"), report, FitParams(n_ctx=4096))
    assert p.placement().devices == ["CUDA0", "CUDA1"]
    # NVML's per-process memory lands on llama.cpp's name for the same GPU
    nvml.processes[RTX_3090.bus_id] = [SimpleNamespace(pid=4242, usedGpuMemory=5000 * MIB)]
    assert hardware.process_gpu_mib(4242, nvml, report.usable_gpus) == {"CUDA0": 5000.0}
    assert hardware.process_gpu_mib(4242, nvml) == {"CUDA1": 5000.0}  # NVML's index, without the devices


def test_without_bus_ids_cuda_devices_take_nvml_gpus_in_order() -> None:
    unnamed = Device("CUDA0", "NVIDIA GeForce RTX 3080", "gpu", "CUDA", 9000, 10240)
    nvml = FakeNVML([RTX_3080], fail={"nvmlDeviceGetPciInfo": pynvml.NVML_ERROR_NOT_SUPPORTED})
    [gpu] = machine(unnamed, nvml=nvml).usable_gpus
    assert (gpu.device, gpu.free_mib, gpu.bandwidth_gbs) == ("CUDA0", 9420, 760.1)


def test_an_nvidia_gpu_the_build_cannot_use_still_gets_the_fix() -> None:
    report = machine(nvml=FakeNVML([RTX_3080]))  # llama.cpp lists the CPU alone
    assert report.gpus and report.usable_gpus == [] and not report.gpu_offload_supported
    assert "without GPU support" in report.gpu_problem and report.reinstall_command


def test_a_gpu_nvml_sees_but_llama_cpp_does_not_list_is_left_out_with_a_note() -> None:
    report = machine(CUDA_3090, nvml=FakeNVML([RTX_3080, RTX_3090]))
    assert [g.device for g in report.usable_gpus] == ["CUDA0"]
    assert "NVIDIA GeForce RTX 3080 (0000:01:00.0), which llama.cpp does not list" in report.nvml_error


# --- reading the list: once, and again only for figures NVML cannot give ----------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counted(devices: list[Device], clock: Clock, error: str | None = None) -> LocalDevices:
    return LocalDevices(read=lambda: Inventory([CPU, *devices], error=error), clock=clock)


def test_nvidia_figures_come_from_nvml_so_the_list_is_read_once() -> None:
    clock = Clock()
    source = counted([CUDA_3090], clock)
    for _ in range(3):
        probe(nvml=FakeNVML([RTX_3090]), llama=stand_in_llama(), devices=source)
        clock.now += 10 * REFRESH_S
    assert source.reads == 1


def test_other_gpus_figures_are_read_again_when_old() -> None:
    clock = Clock()
    source = counted([RX_7900_XTX], clock)
    probe(nvml=FakeNVML([]), llama=stand_in_llama(), devices=source)
    clock.now += REFRESH_S / 2
    probe(nvml=FakeNVML([]), llama=stand_in_llama(), devices=source)
    assert source.reads == 1
    clock.now += REFRESH_S
    probe(nvml=FakeNVML([]), llama=stand_in_llama(), devices=source)
    assert source.reads == 2


def test_a_failed_read_falls_back_to_nvml_and_is_retried_later() -> None:
    clock = Clock()
    source = counted([], clock, error="the device probe failed: exit 1")
    import llama_cpp

    report = probe(nvml=FakeNVML([RTX_3080]), llama=llama_cpp, devices=source)
    assert report.devices_error == "the device probe failed: exit 1"
    assert [g.name for g in report.gpus] == ["NVIDIA GeForce RTX 3080"]  # NVML's, named CUDA<n> by order
    assert fit.device_name(report.gpus[0], 0) == "CUDA0"
    assert any(line.startswith("Devices    llama.cpp's device list could not be read")
               for line in hardware.report_lines(report))
    probe(nvml=FakeNVML([]), llama=llama_cpp, devices=source)
    assert source.reads == 1
    clock.now += RETRY_S + 1
    probe(nvml=FakeNVML([]), llama=llama_cpp, devices=source)
    assert source.reads == 2


def test_this_machines_list_is_llama_cpps_registry_read_in_a_child() -> None:
    """The real reader: the same devices the registry lists in this process, with their memory."""
    found = local_devices.get()
    assert found.error is None
    in_process = ggml.devices_without_memory()
    assert [(d.name, d.kind) for d in found.devices] == [(d.name, d.kind) for d in in_process]
    assert all(d.total_mib > 0 for d in found.devices if d.kind == "cpu")
