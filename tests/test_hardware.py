"""Hardware probe: this machine as it is, and NVIDIA GPUs with NVML's answers substituted at its boundary.

The stand-in for the `pynvml` module (FakeNVML) answers with pynvml's own types: its real error classes
(built from NVML error codes) and its real `c_nvmlMemory_t` structure. Everything else (psutil,
/proc, the installed llama-cpp-python) is real unless a test says otherwise.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import psutil
import pynvml
import pytest

from bridge import hardware, install_hint
from bridge.cli import main
from bridge.errors import BadRequest
from bridge.hardware import GPUInfo, probe, summary_line, what_if

MIB = 1024 * 1024


@dataclass
class FakeGPU:
    name: str | bytes
    total_mib: int
    free_mib: int
    capability: tuple[int, int]
    bus_bits: int
    mem_clock_mhz: int
    bus_id: bytes = b"00000000:01:00.0"  # as NVML writes it


RTX_3080 = FakeGPU("NVIDIA GeForce RTX 3080", 10240, 9420, (8, 6), 320, 9501)
RTX_3090 = FakeGPU("NVIDIA GeForce RTX 3090", 24576, 23800, (8, 6), 384, 9751, b"00000000:2B:00.0")
RTX_4090 = FakeGPU("NVIDIA GeForce RTX 4090", 24564, 24000, (8, 9), 384, 10501)
H100_PCIE = FakeGPU("NVIDIA H100 PCIe", 81559, 81000, (9, 0), 5120, 1593, b"00000000:C1:00.0")


class FakeNVML:
    """Stands in for the `pynvml` module. `fail` maps a function name to the NVML error code it raises."""

    NVMLError = pynvml.NVMLError
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM

    def __init__(self, gpus: list[FakeGPU], init_error: int | None = None,
                 fail: dict[str, int] | None = None, driver: str = "550.54.14") -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.fail = fail or {}
        self.driver = driver
        self.initialized = False
        self.shutdowns = 0
        self.processes: dict[bytes, list[SimpleNamespace]] = {}  # bus id -> processes using the GPU

    def _answer(self, function: str, value: object) -> object:
        assert self.initialized, f"{function} called before nvmlInit"
        if function in self.fail:
            raise pynvml.NVMLError(self.fail[function])
        return value

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._answer("nvmlShutdown", None)
        self.shutdowns += 1
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> object:
        return self._answer("nvmlSystemGetDriverVersion", self.driver)

    def nvmlDeviceGetCount(self) -> object:
        return self._answer("nvmlDeviceGetCount", len(self.gpus))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        return self._answer("nvmlDeviceGetHandleByIndex", self.gpus[index])

    def nvmlDeviceGetName(self, gpu: FakeGPU) -> object:
        return self._answer("nvmlDeviceGetName", gpu.name)

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGPU) -> object:
        used = gpu.total_mib - gpu.free_mib
        memory = pynvml.c_nvmlMemory_t(total=gpu.total_mib * MIB, free=gpu.free_mib * MIB, used=used * MIB)
        return self._answer("nvmlDeviceGetMemoryInfo", memory)

    def nvmlDeviceGetCudaComputeCapability(self, gpu: FakeGPU) -> object:
        return self._answer("nvmlDeviceGetCudaComputeCapability", gpu.capability)

    def nvmlDeviceGetMemoryBusWidth(self, gpu: FakeGPU) -> object:
        return self._answer("nvmlDeviceGetMemoryBusWidth", gpu.bus_bits)

    def nvmlDeviceGetMaxClockInfo(self, gpu: FakeGPU, clock: int) -> object:
        assert clock == pynvml.NVML_CLOCK_MEM, "bandwidth needs the memory clock, not the graphics clock"
        return self._answer("nvmlDeviceGetMaxClockInfo", gpu.mem_clock_mhz)

    def nvmlDeviceGetPciInfo(self, gpu: FakeGPU) -> object:
        return self._answer("nvmlDeviceGetPciInfo", pynvml.nvmlPciInfo_t(busId=gpu.bus_id))

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGPU) -> object:
        return self._answer("nvmlDeviceGetComputeRunningProcesses", self.processes.get(gpu.bus_id, []))


def cuda_llama(offload: bool = True) -> SimpleNamespace:
    """Stands in for a llama_cpp module built with (or without) CUDA, which this CPU machine cannot have."""
    return SimpleNamespace(
        __version__="0.3.36",
        llama_supports_gpu_offload=lambda: offload,
        llama_print_system_info=lambda: b"CUDA : ARCHS = 860 | CPU : AVX2 = 1 | ",
    )


def has_nvidia_device() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


# --- this machine ------------------------------------------------------------------------------------

def test_ram_swap_and_cores_match_psutil() -> None:
    before = psutil.virtual_memory().available // MIB
    report = probe()
    after = psutil.virtual_memory().available // MIB
    ram, swap = psutil.virtual_memory(), psutil.swap_memory()
    assert report.ram_total_mib == ram.total // MIB
    # other processes move "available" a little between the readings
    assert min(before, after) - 64 <= report.ram_available_mib <= max(before, after) + 64
    assert report.swap_total_mib == swap.total // MIB
    assert report.cpu.cores_logical == psutil.cpu_count(logical=True)
    assert report.cpu.cores_physical == (psutil.cpu_count(logical=False) or psutil.cpu_count())
    assert 0 < report.ram_available_mib <= report.ram_total_mib


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/cpuinfo is Linux's")
def test_cpu_flags_match_proc_cpuinfo() -> None:
    flags_line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags"))
    flags = flags_line.partition(":")[2].split()
    cpu = probe().cpu
    assert cpu.avx2 == ("avx2" in flags)
    assert cpu.avx512 == ("avx512f" in flags)
    assert cpu.model and cpu.model != "unknown CPU"


@pytest.mark.skipif(has_nvidia_device(), reason="this machine has an NVIDIA GPU")
def test_this_machine_has_no_gpu_and_says_so() -> None:
    report = probe()
    assert report.gpus == []
    assert report.usable_gpus == []
    assert report.nvml_error  # why no GPU was seen
    assert report.gpu_problem is None and report.reinstall_command is None
    assert summary_line(report).startswith("No GPU · ")


def test_offload_support_is_a_local_gpu_in_llama_cpps_device_list() -> None:
    """With the RPC backend compiled in, `llama_supports_gpu_offload()` is true on a CPU-only build; the
    report looks at the devices llama.cpp really has."""
    import llama_cpp

    from bridge.devices import ggml

    report = probe()
    local_gpus = [d for d in ggml.devices_without_memory() if d.offloads and not d.is_rpc]
    assert report.gpu_offload_supported == bool(local_gpus)
    if llama_cpp.llama_supports_rpc() and not local_gpus:  # this test machine: RPC built in, no GPU
        assert llama_cpp.llama_supports_gpu_offload() and not report.gpu_offload_supported
    assert report.llama_cpp_version == llama_cpp.__version__
    assert report.llama_cpp_error is None


def test_docker_seen_from_dockerenv_cgroup_or_overlay_root(tmp_path: Path) -> None:
    assert hardware.in_docker(tmp_path) is False
    (tmp_path / "proc/1").mkdir(parents=True)
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/1/cgroup").write_text("0::/\n")
    (tmp_path / "proc/self/mountinfo").write_text(
        "22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw\n"
        "25 22 0:5 / /dev rw,nosuid - devtmpfs udev rw\n")
    assert hardware.in_docker(tmp_path) is False

    (tmp_path / "proc/self/mountinfo").write_text(
        "600 500 0:52 / / rw,relatime master:300 - overlay overlay rw,lowerdir=/var/lib/docker/l\n")
    assert hardware.in_docker(tmp_path) is True

    (tmp_path / "proc/self/mountinfo").write_text("")
    (tmp_path / "proc/1/cgroup").write_text("12:pids:/docker/3f1c9a\n")
    assert hardware.in_docker(tmp_path) is True

    (tmp_path / "proc/1/cgroup").write_text("")
    (tmp_path / ".dockerenv").touch()
    assert hardware.in_docker(tmp_path) is True


def test_cpu_flags_from_llama_cpp_when_there_is_no_proc_cpuinfo(tmp_path: Path) -> None:
    cpu = hardware.cpu_info(cpuinfo_path=tmp_path / "missing", llama=cuda_llama())
    assert (cpu.avx2, cpu.avx512) == (True, False)
    (tmp_path / "cpuinfo").write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7-12700K\nflags\t\t: fpu sse2 avx avx2 fma\n")
    cpu = hardware.cpu_info(cpuinfo_path=tmp_path / "cpuinfo")
    assert cpu.model == "Intel(R) Core(TM) i7-12700K"
    assert (cpu.avx2, cpu.avx512) == (True, False)


# --- NVIDIA GPUs through NVML ------------------------------------------------------------------------

def test_one_gpu() -> None:
    nvml = FakeNVML([RTX_3080])
    report = probe(nvml=nvml, llama=cuda_llama())
    [gpu] = report.gpus
    assert gpu == GPUInfo(index=0, name="NVIDIA GeForce RTX 3080", total_mib=10240, free_mib=9420,
                          used_mib=820, driver="550.54.14", compute_capability="8.6", bandwidth_gbs=760.1,
                          pci_bus_id="0000:01:00.0")
    assert report.usable_gpus == [gpu]
    assert report.nvml_error is None and report.gpu_problem is None
    assert nvml.shutdowns == 1
    assert summary_line(report).startswith("RTX 3080 10 GB (9.2 GB free) · ")


def test_two_gpus() -> None:
    nvml = FakeNVML([RTX_3090, H100_PCIE])
    report = probe(nvml=nvml, llama=cuda_llama())
    names = [gpu.name for gpu in report.gpus]
    assert names == ["NVIDIA GeForce RTX 3090", "NVIDIA H100 PCIe"]
    assert [gpu.index for gpu in report.gpus] == [0, 1]
    assert [gpu.total_mib for gpu in report.gpus] == [24576, 81559]
    assert [gpu.free_mib for gpu in report.gpus] == [23800, 81000]
    assert [gpu.used_mib for gpu in report.gpus] == [776, 559]
    assert [gpu.compute_capability for gpu in report.gpus] == ["8.6", "9.0"]
    assert nvml.shutdowns == 1
    assert summary_line(report).startswith("RTX 3090 24 GB (23 GB free) + H100 PCIe 80 GB (79 GB free) · ")


@pytest.mark.parametrize(("gpu", "published_gbs"), [
    (RTX_3080, 760), (RTX_3090, 936), (RTX_4090, 1008), (H100_PCIE, 2000),
])
def test_bandwidth_from_bus_width_and_memory_clock_matches_published_figures(
        gpu: FakeGPU, published_gbs: float) -> None:
    [found] = probe(nvml=FakeNVML([gpu]), llama=cuda_llama()).gpus
    assert found.bandwidth_gbs == pytest.approx(published_gbs, rel=0.03)


def test_old_bindings_answer_bytes() -> None:
    gpu = FakeGPU(b"NVIDIA GeForce RTX 3080", 10240, 9420, (8, 6), 320, 9501)
    report = probe(nvml=FakeNVML([gpu], driver=b"470.82.01"), llama=cuda_llama())  # type: ignore[arg-type]
    assert report.gpus[0].name == "NVIDIA GeForce RTX 3080"
    assert report.gpus[0].driver == "470.82.01"


def test_nvml_library_missing() -> None:
    nvml = FakeNVML([RTX_3080], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    report = probe(nvml=nvml, llama=cuda_llama())
    assert report.gpus == []
    assert "not installed" in report.nvml_error
    assert report.gpu_problem is None
    assert nvml.shutdowns == 0  # nothing was started, so there is nothing to shut down


def test_nvml_init_error() -> None:
    nvml = FakeNVML([RTX_3080], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    report = probe(nvml=nvml, llama=cuda_llama())
    assert report.gpus == []
    assert report.nvml_error == "the NVIDIA driver is installed but not loaded"
    assert summary_line(report).startswith("No GPU")


def test_nvml_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    report = probe(llama=cuda_llama())
    assert report.gpus == []
    assert "nvidia-ml-py" in report.nvml_error


def test_bandwidth_not_supported_leaves_the_rest_of_the_gpu() -> None:
    not_supported = {"nvmlDeviceGetMemoryBusWidth": pynvml.NVML_ERROR_NOT_SUPPORTED}
    nvml = FakeNVML([RTX_3080, RTX_3090], fail=not_supported)
    report = probe(nvml=nvml, llama=cuda_llama())
    assert [gpu.bandwidth_gbs for gpu in report.gpus] == [None, None]
    assert [gpu.free_mib for gpu in report.gpus] == [9420, 23800]
    assert "GPU 0: reading its memory bandwidth failed: NVML error: Not Supported" in report.nvml_error
    assert nvml.shutdowns == 1


def test_gpu_whose_memory_cannot_be_read_is_left_out() -> None:
    nvml = FakeNVML([RTX_3080], fail={"nvmlDeviceGetMemoryInfo": pynvml.NVML_ERROR_GPU_IS_LOST})
    report = probe(nvml=nvml, llama=cuda_llama())
    assert report.gpus == []
    assert "GPU 0: reading its memory (GPU left out) failed" in report.nvml_error
    assert nvml.shutdowns == 1


@pytest.mark.parametrize("function", [
    "nvmlDeviceGetCount", "nvmlSystemGetDriverVersion", "nvmlDeviceGetName",
    "nvmlDeviceGetCudaComputeCapability", "nvmlDeviceGetMaxClockInfo", "nvmlDeviceGetPciInfo", "nvmlShutdown",
])
def test_any_nvml_call_failing_gives_a_report_and_a_note(function: str) -> None:
    nvml = FakeNVML([RTX_3080], fail={function: pynvml.NVML_ERROR_UNKNOWN})
    report = probe(nvml=nvml, llama=cuda_llama())
    assert "Unknown Error" in report.nvml_error
    assert summary_line(report)  # still presentable


def test_bindings_without_a_function_do_not_crash() -> None:
    nvml = FakeNVML([RTX_3080])
    nvml.nvmlDeviceGetMemoryBusWidth = None  # type: ignore[assignment]  # calling it raises TypeError
    report = probe(nvml=nvml, llama=cuda_llama())
    assert report.gpus[0].bandwidth_gbs is None
    assert report.gpus[0].free_mib == 9420


# --- the build cannot use the GPU --------------------------------------------------------------------

def is_prebuilt_install(command: str, version: str) -> bool:
    """A command that installs a prebuilt wheel of `version` (tests/test_install_hint.py checks the rest)."""
    return (f"--only-binary llama-cpp-python --extra-index-url {install_hint.WHEEL_INDEX}/" in command
            and command.endswith(f" llama-cpp-python=={version}") and "CMAKE_ARGS" not in command)


def test_gpu_present_but_build_cannot_offload() -> None:
    report = probe(nvml=FakeNVML([RTX_3080]), llama=cuda_llama(offload=False))
    assert report.gpus and report.usable_gpus == []
    assert "without GPU support" in report.gpu_problem
    assert is_prebuilt_install(report.reinstall_command, "0.3.36")
    assert "not usable by this llama-cpp-python build" in summary_line(report)


def _builds_local_gpu() -> bool:
    """Whether the installed llama.cpp has a local GPU device (RPC compiled in does not count)."""
    from bridge.devices import ggml

    return any(d.offloads and not d.is_rpc for d in ggml.devices_without_memory())


def test_gpu_present_with_the_installed_cpu_build() -> None:
    import llama_cpp

    if _builds_local_gpu():
        pytest.skip("the installed llama-cpp-python can offload to a GPU")
    report = probe(nvml=FakeNVML([RTX_3080]))
    assert is_prebuilt_install(report.reinstall_command, llama_cpp.__version__)


def test_gpu_present_but_llama_cpp_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    report = probe(nvml=FakeNVML([RTX_3080]))
    assert report.llama_cpp_version is None and "cannot be imported" in report.llama_cpp_error
    assert "cannot be imported" in report.gpu_problem
    assert is_prebuilt_install(report.reinstall_command, install_hint.version_to_install())


# --- what if -----------------------------------------------------------------------------------------

@pytest.fixture
def one_gpu_report() -> hardware.HardwareReport:
    return probe(nvml=FakeNVML([RTX_3080]), llama=cuda_llama())


def test_what_if_replaces_free_memory(one_gpu_report: hardware.HardwareReport) -> None:
    changed = what_if(one_gpu_report, [81000], 64000)
    [gpu] = changed.gpus
    assert gpu.name == "NVIDIA GeForce RTX 3080"
    assert (gpu.free_mib, gpu.total_mib, gpu.used_mib) == (81000, 81000, 0)
    assert changed.ram_available_mib == 64000
    assert changed.hypothetical
    assert one_gpu_report.gpus[0].free_mib == 9420  # the original is untouched


def test_what_if_extra_entries_are_synthetic_gpus(one_gpu_report: hardware.HardwareReport) -> None:
    changed = what_if(one_gpu_report, [8000, 12000, 6000], None)
    assert [gpu.name for gpu in changed.gpus] == ["NVIDIA GeForce RTX 3080", "GPU1", "GPU2"]
    assert [gpu.free_mib for gpu in changed.gpus] == [8000, 12000, 6000]
    assert [gpu.synthetic for gpu in changed.gpus] == [False, True, True]
    assert changed.ram_available_mib == one_gpu_report.ram_available_mib


def test_what_if_gpus_on_a_machine_without_one() -> None:
    report = probe(nvml=FakeNVML([]), llama=cuda_llama(offload=False))
    changed = what_if(report, [24000, 24000], None)
    assert [gpu.name for gpu in changed.gpus] == ["GPU0", "GPU1"]
    assert len(changed.usable_gpus) == 2


def test_what_if_zero_means_no_gpu(one_gpu_report: hardware.HardwareReport) -> None:
    changed = what_if(one_gpu_report, [0], None)
    assert changed.gpus == [] and changed.usable_gpus == []
    assert what_if(one_gpu_report, None, None).gpus == one_gpu_report.gpus


def test_what_if_rejects_negative_memory(one_gpu_report: hardware.HardwareReport) -> None:
    with pytest.raises(BadRequest, match="--gpu-mib must be"):
        what_if(one_gpu_report, [-1], None)
    with pytest.raises(BadRequest, match="--ram-mib must be"):
        what_if(one_gpu_report, None, -5)


# --- presentation ------------------------------------------------------------------------------------

def test_summary_line_and_sizes(one_gpu_report: hardware.HardwareReport) -> None:
    report = what_if(one_gpu_report, None, 21 * 1024)
    report.ram_total_mib = 32 * 1024
    report.cpu = hardware.CPUInfo("x", cores_physical=8, cores_logical=16, avx2=True, avx512=False)
    assert summary_line(report) == "RTX 3080 10 GB (9.2 GB free) · 32 GB RAM (21 GB free) · 8 cores AVX2"
    assert [hardware.gb(mib) for mib in (512, 8192, 9420, 24576)] == ["0.5 GB", "8 GB", "9.2 GB", "24 GB"]


def test_report_to_dict_is_json(one_gpu_report: hardware.HardwareReport) -> None:
    data = json.loads(json.dumps(hardware.report_to_dict(one_gpu_report)))
    assert data["gpus"][0]["bandwidth_gbs"] == 760.1
    assert data["usable_gpu_count"] == 1
    assert data["summary"] == summary_line(one_gpu_report)


# --- the command line --------------------------------------------------------------------------------

@pytest.mark.skipif(has_nvidia_device(), reason="this machine has an NVIDIA GPU")
def test_cli_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hardware"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("No GPU · ")
    assert "No GPU this llama.cpp build can use: models run on the CPU." in out
    assert f"{psutil.virtual_memory().total // MIB} MiB total" in out


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hardware", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ram_total_mib"] == psutil.virtual_memory().total // MIB
    assert set(data["cpu"]) >= {"model", "cores_physical", "cores_logical", "avx2", "avx512"}


def test_cli_shows_gpus_and_the_fix(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import llama_cpp

    if _builds_local_gpu():
        pytest.skip("the installed llama-cpp-python can offload to a GPU")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([RTX_3080, RTX_3090]))
    assert main(["hardware"]) == 0
    out = capsys.readouterr().out
    assert "GPU 0      NVIDIA GeForce RTX 3080 · 10240 MiB total, 9420 MiB free, 820 MiB used" in out
    assert "GPU 1      NVIDIA GeForce RTX 3090" in out
    assert "compute capability 8.6 · 760.1 GB/s · driver 550.54.14" in out
    fix = next(line for line in out.splitlines() if line.startswith("Fix        "))
    assert is_prebuilt_install(fix, llama_cpp.__version__)
