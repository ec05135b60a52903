"""Plans for what will be free: a swap, the quant badges and the recommendations while a model is loaded
count the memory that model holds as free; its use is measured (NVML per process where there is a GPU,
llama.cpp's buffers otherwise); the GPU overhead llama.cpp never logs is learned from a real load."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from bridge import fit, hardware, planning
from bridge.devices.overhead import learned_overheads
from bridge.gguf import read_file
from bridge.hardware import CPUInfo, GPUInfo, HardwareReport


def machine(gpu_free: int, ram_available: int) -> HardwareReport:
    gpu = GPUInfo(index=0, name="NVIDIA GeForce RTX 4070", total_mib=12282, free_mib=gpu_free,
                  used_mib=12282 - gpu_free, driver="560.35")
    return HardwareReport(cpu=CPUInfo("cpu", 8, 16, True, False), ram_total_mib=32000,
                          ram_available_mib=ram_available, swap_total_mib=0, swap_free_mib=0, gpus=[gpu],
                          gpu_offload_supported=True)


class FakeNVML:
    """NVML's answers at its boundary: one GPU on which process `pid` holds `used` bytes."""

    def __init__(self, pid: int, used_mib: float) -> None:
        self.pid, self.used = pid, int(used_mib * (1 << 20))

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=self.pid, usedGpuMemory=self.used),
                SimpleNamespace(pid=self.pid + 1, usedGpuMemory=1 << 30)]


def test_a_swap_sees_the_loaded_models_memory_as_free() -> None:
    now = machine(gpu_free=1200, ram_available=9000)  # an 8B at Q8_0 holds most of the card
    loaded = planning.LoadedUse("llama-8b-Q8_0", gpu_mib={"CUDA0": 9100.0}, ram_mib=700.0)
    freed = planning.after_unload(now, loaded)
    assert freed.gpus[0].free_mib == 10300 and freed.ram_available_mib == 9700
    assert now.gpus[0].free_mib == 1200  # the probe's own report is left alone
    assert "once llama-8b-Q8_0 is unloaded" in planning.budget_note(loaded)
    # never more than the card has
    assert planning.after_unload(now, planning.LoadedUse("x", {"CUDA0": 1e6})).gpus[0].free_mib == 12282


def test_the_loaded_quant_fits_where_it_already_runs(llama8b_path: Path) -> None:
    """The badge of the loaded quant must not say "won't fit" because the model itself fills the card."""
    now = machine(gpu_free=900, ram_available=20000)
    layout = fit.ModelLayout.from_header(read_file(llama8b_path))
    assert fit.plan(layout, now).verdict != "full_gpu"
    loaded = planning.LoadedUse("llama-8b", gpu_mib={"CUDA0": 6000.0}, ram_mib=500.0)
    assert fit.plan(layout, planning.after_unload(now, loaded)).verdict == "full_gpu"


def test_loaded_use_is_measured_per_process_where_nvml_can() -> None:
    gpu = machine(1000, 9000).gpus[0]
    nvml = FakeNVML(pid=4242, used_mib=5300)
    assert hardware.process_gpu_mib(4242, nvml) == {"CUDA0": 5300.0}
    allocation = {"devices": {"CUDA0": {"total_mib": 4700.0}, "CPU": {"total_mib": 300.0}}}
    use = planning.loaded_use("m", None, allocation, [gpu])
    assert use.gpu_mib == {"CUDA0": 4700.0 + fit.CUDA_CONTEXT_MIB}  # no process to ask: buffers + default


def test_the_gpu_overhead_is_learned_from_a_real_load_and_used_by_later_plans(tmp_path: Path) -> None:
    report = machine(1000, 9000)
    gpu = report.gpus[0]
    allocation = {"devices": {"CUDA0": {"total_mib": 4700.0}}}
    loaded = planning.LoadedUse("m", gpu_mib={"CUDA0": 5450.0}, per_process={"CUDA0": 5450.0})
    store = learned_overheads(tmp_path)
    assert store.learn([gpu], loaded, allocation) == {"NVIDIA GeForce RTX 4070 | driver 560.35": 750.0}
    later = machine(1000, 9000)
    store.apply(later)
    assert later.gpus[0].overhead_mib == 750.0
    assert fit.budget_for(later).gpu_overhead == [750.0]  # instead of the H100's 600 MiB
    # a smaller figure later does not lower it: plans err on the side of fitting
    smaller = planning.LoadedUse("m", per_process={"CUDA0": 5000.0})
    assert store.learn([gpu], smaller, allocation) == {}


def test_the_chat_memory_store_is_in_the_ram_budget() -> None:
    report = machine(gpu_free=0, ram_available=8000)
    report.gpus = []
    without = fit.budget_for(report).ram_usable
    assert fit.budget_for(report, extra_host_mib=1024).ram_usable == without - 1024


LOAD_LOG = """\
load_tensors: layer   0 assigned to device CPU, is_swa = 0
load_tensors: layer   1 assigned to device RPC0, is_swa = 0
load_tensors: layer   2 assigned to device RPC1, is_swa = 0
load_tensors:   CPU_Mapped model buffer size =    61.50 MiB
load_tensors: RPC0[127.0.0.1:50052] model buffer size =  1200.00 MiB
load_tensors: RPC0[127.0.0.1:50053] model buffer size =   900.00 MiB
llama_kv_cache: RPC0[127.0.0.1:50052] KV buffer size =   128.00 MiB
llama_kv_cache: RPC0[127.0.0.1:50053] KV buffer size =    64.00 MiB
llama_context:  CPU  output buffer size =     0.12 MiB
sched_reserve: RPC0[127.0.0.1:50052] compute buffer size =   300.00 MiB
sched_reserve: RPC0[127.0.0.1:50053] compute buffer size =   250.00 MiB
sched_reserve:        CPU compute buffer size =    20.00 MiB
"""


def test_the_load_log_reads_as_buffers_per_device() -> None:
    from bridge.devices.actual import parse_load_log, rpc_buffer_aliases
    from bridge.devices.ggml import Device

    devices = [Device("RPC0", "127.0.0.1:50052", "gpu", "RPC", 0, 0),
               Device("RPC1", "127.0.0.1:50053", "gpu", "RPC", 0, 0)]
    found = parse_load_log(LOAD_LOG.splitlines(), rpc_buffer_aliases(devices))
    assert found.devices["RPC1"].weights_mib == 900.0 and found.devices["RPC1"].kv_mib == 64.0
    assert found.devices["RPC0"].total_mib == 1628.0
    assert found.layers_on("RPC1") == 1 and found.layers_on("CPU") == 1


def test_differences_over_five_percent_or_64_mib_are_reported() -> None:
    from bridge.devices.actual import compare, parse_load_log

    found = parse_load_log(LOAD_LOG.splitlines())  # without aliases both servers' buffers read as RPC0
    planned = {"RPC0": {"weights_mib": 2100.0, "kv_mib": 192.0, "compute_mib": 400.0},
               "CPU": {"weights_mib": 60.0, "kv_mib": 0.0, "compute_mib": 20.0}}
    differences = compare(planned, found)
    assert [(d.device, d.part) for d in differences] == [("RPC0", "compute")]  # 550 vs 400: over 64 MiB
    assert "planned 400.0 MiB, llama.cpp allocated 550.0 MiB" in str(differences[0])
    # a device that got buffers without being planned is a difference of its own
    assert {d.device for d in compare({"CPU": planned["CPU"]}, found)} == {"RPC0"}


def test_large_batch_work_of_layers_in_ram_goes_to_the_first_local_gpu_never_to_a_worker(
        llama8b_path: Path) -> None:
    """llama.cpp's RPC backend takes no offloaded ops: with a worker listed first and a local GPU after it,
    the local GPU runs the big prompt batches of the layers kept in RAM (and needs the buffer for it)."""
    header = read_file(llama8b_path)
    params = fit.FitParams(n_ctx=8192, gpu_layers=20)
    as_if_worker = fit.memory_breakdown(header, params, [8000.0, 8000.0], offload_gpu=0)
    local = fit.memory_breakdown(header, params, [8000.0, 8000.0], offload_gpu=1)
    assert local.gpus[0].compute_mib < as_if_worker.gpus[0].compute_mib
    assert local.gpus[1].compute_mib >= as_if_worker.gpus[1].compute_mib
    only_workers = fit.memory_breakdown(header, params, [8000.0], offload_gpu=None)
    one_local = fit.memory_breakdown(header, params, [8000.0])
    # without a GPU taking the work, the CPU computes its layers' big batches itself: a bigger host buffer
    assert only_workers.host.compute_mib > one_local.host.compute_mib + 64
    report = machine(gpu_free=8000, ram_available=20000)
    worker = GPUInfo(index=0, name="RTX 3060 on 192.168.1.20:50052", total_mib=12288, free_mib=12000,
                     used_mib=288, device="RPC0", rpc_endpoint="192.168.1.20:50052")
    report.gpus = [worker, *report.gpus]
    assert fit.budget_for(report).offload_gpu == 1
