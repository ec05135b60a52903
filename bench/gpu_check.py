"""On a machine with an NVIDIA GPU: does llama.cpp load exactly what the planner planned?

    bash bench/gpu_check.sh          (builds llama-cpp-python with CUDA first, then runs this)

For shape-faithful sparse models of real architectures (the test fixtures' Llama-3.1-8B and Mixtral-8x7B
shapes, all-zero data), under four plans the planner itself chose (everything on the GPU; part of the
layers on the GPU; every layer on the GPU with some layers' experts in RAM; the CPU alone), it loads the
model through the bridge's engine and prints, per device, the planned weights / KV / compute beside the
buffers llama.cpp allocated, and the GPU memory NVML attributes to the worker process beside the planned
total with its overhead. Then the bridge's decode speed at 1024 tokens against a bare low-level loop
(bench/throughput.py) on the GPU. Partial plans are made by telling the planner the GPU is smaller than
it is; llama.cpp is then handed that placement explicitly, so the rest of the card stays unused.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge import fit, hardware, planning
from bridge.devices.actual import Allocation, compare
from bridge.engine.client import Engine
from bridge.engine.types import LoadSpec
from bridge.gguf import read_file
from tests.fixtures.sparse_models import ALL_SPECS, write_sparse_model

CTX = 8192


def smaller_gpu(report: hardware.HardwareReport, usable_mib: float) -> hardware.HardwareReport:
    machine = copy.deepcopy(report)
    gpu = machine.gpus[0]
    gpu.free_mib = gpu.total_mib = round(usable_mib + fit.GPU_MARGIN_MIN_MIB + fit.gpu_overhead_mib(gpu))
    machine.gpus = [gpu]
    return machine


def need(layout: fit.ModelLayout, report: hardware.HardwareReport, **params: object) -> float:
    bd = fit.memory_breakdown(layout, fit.FitParams(n_ctx=CTX, **params), [1e6])  # type: ignore[arg-type]
    return bd.gpus[0].total_mib - bd.gpus[0].overhead_mib


async def check(label: str, path: Path, report: hardware.HardwareReport, cpu_only: bool = False) -> None:
    layout = fit.ModelLayout.from_header(read_file(path))
    plan = fit.plan(layout, report, fit.FitParams(n_ctx=CTX))
    placement = plan.placement()
    if cpu_only:
        plan = fit.plan(layout, hardware.what_if(report, [0], None), fit.FitParams(n_ctx=CTX))
        placement = plan.placement()
    bd = plan.breakdown
    print(f"\n== {label}: {path.name}, verdict {plan.verdict}, devices {placement.devices or ['none']}, "
          f"layers {placement.layers}, experts of {placement.n_cpu_moe} blocks in RAM", flush=True)
    engine = Engine()
    started = time.perf_counter()
    try:
        await engine.load(LoadSpec(model_path=str(path), model_id=path.stem, n_ctx=bd.n_ctx,
                                   kv_type=bd.kv_type_k, flash_attn=bd.flash_attn, chat_memory_mib=0,
                                   placement=placement))
        status = engine.status()
        per_process = hardware.process_gpu_mib(status.pid or 0)
    finally:
        await engine.close()
    planned = planning.planned_per_device(plan.to_dict())
    actual = Allocation.from_dict(status.allocation)
    print(f"loaded in {time.perf_counter() - started:.1f} s; layers per device {status.allocation['layers']}")
    print(f"{'device':8} {'part':8} {'planned MiB':>12} {'allocated MiB':>14}")
    for device in sorted(set(planned) | set(actual.devices)):
        use = actual.devices.get(device)
        for part in ("weights", "kv", "compute"):
            p = planned.get(device, {}).get(f"{part}_mib", 0.0)
            a = getattr(use, f"{part}_mib") if use else 0.0
            print(f"{device:8} {part:8} {p:12.1f} {a:14.1f}")
    for gpu_dev in plan.to_dict()["devices"][:-1]:
        name = gpu_dev["device"]
        logged = actual.devices[name].total_mib if name in actual.devices else 0.0
        print(f"{name}: NVML per-process {per_process.get(name, 0.0):.0f} MiB, planned total with overhead "
              f"{gpu_dev['total_mib']:.0f} MiB, logged buffers {logged:.0f} MiB")
    if cpu_only:
        print(f"CPU-only plan: NVML per-process on the GPUs {per_process or 'nothing'} "
              "(what loading a CUDA build costs with no GPU device in the plan)")
    differences = compare(planned, actual)
    print("differences over 5% or 64 MiB: " + ("; ".join(map(str, differences)) or "none"))


async def main() -> None:
    report = hardware.probe()
    if not report.usable_gpus:
        sys.exit(f"no usable GPU: {report.gpu_problem or report.nvml_error or 'none found'}")
    gpu = report.usable_gpus[0]
    print(f"GPU {gpu.name}, {gpu.free_mib} of {gpu.total_mib} MiB free, driver {gpu.driver}")
    with tempfile.TemporaryDirectory() as tmp:
        dense = write_sparse_model(Path(tmp) / "llama31-8b.gguf", ALL_SPECS["llama31-8b"])
        moe = write_sparse_model(Path(tmp) / "mixtral-8x7b.gguf", ALL_SPECS["mixtral-8x7b"])
        dense_layout = fit.ModelLayout.from_header(read_file(dense))
        moe_layout = fit.ModelLayout.from_header(read_file(moe))
        await check("full offload", dense, smaller_gpu(report, 2 * need(dense_layout, report)))
        await check("partial offload", dense, smaller_gpu(report, 0.55 * need(dense_layout, report)))
        half = (need(moe_layout, report) + need(moe_layout, report, cpu_moe=True)) / 2
        await check("experts in RAM", moe, smaller_gpu(report, half))
        await check("CPU only", dense, report, cpu_only=True)
    print("\n== decode speed on the GPU (~1B random model, 1024 tokens): bridge / bare loop", flush=True)
    subprocess.run([sys.executable, str(Path(__file__).with_name("throughput.py")), "--gen", "1024",
                    "--runs", "2"], check=False)


if __name__ == "__main__":
    asyncio.run(main())
