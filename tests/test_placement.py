"""The plan is what runs: each verdict the planner can return (fully offloaded, split over two devices,
partly offloaded, experts kept in RAM, CPU only) loads in llama.cpp with exactly the planned placement.

The offload devices are real: llama.cpp RPC servers on 127.0.0.1 (tests/fixtures/rpc.py), each a CPU
backend in its own process, reached through the same protocol a GPU on another machine would be. After each
load, the buffers llama.cpp logged per device are compared with the plan (within 5% or 64 MiB, weights
of offloaded layers within 1 MiB), the layers of each device are counted, and no buffer may land on a
device the plan did not name.
"""

from __future__ import annotations

import copy
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import fit, hardware, planning
from bridge.devices.actual import HOST, Allocation, compare
from bridge.devices.placement import DevicePlacement
from bridge.engine.client import Engine
from bridge.engine.types import EngineStatus, LoadSpec
from bridge.gguf import read_file
from bridge.hardware import HardwareReport
from bridge.workers.registry import registry
from tests.fixtures import tiny_model
from tests.fixtures.server import start_server

CTX = 1024
WEIGHTS_TOLERANCE_MIB = 1.0  # alignment padding only: weights are exact tensor bytes


@pytest.fixture(scope="module")
def machine(rpc_servers) -> Iterator[HardwareReport]:
    """This machine as the bridge sees it with the two RPC servers configured."""
    registry.configure([s.endpoint for s in rpc_servers], [])
    registry.refresh()
    try:
        report = hardware.probe()
        assert [g.device for g in report.usable_gpus] == ["RPC0", "RPC1"], report.usable_gpus
        assert not report.gpu_offload_supported  # RPC compiled in is not a local GPU
        yield report
    finally:
        registry.configure([], [])


@pytest.fixture(scope="module")
def moe_model() -> Path:
    return tiny_model.tiny_moe()


def with_free(report: HardwareReport, *free_mib: float) -> HardwareReport:
    """The report with its RPC devices' free memory set (a CPU RPC server reports the host's RAM); a device
    left out of `free_mib` is left out of the machine."""
    machine = copy.deepcopy(report)
    gpus = machine.usable_gpus[: len(free_mib)]
    for gpu, free in zip(gpus, free_mib, strict=True):
        gpu.free_mib = gpu.total_mib = round(free)
        gpu.used_mib = 0
    machine.gpus = gpus
    return machine


def need_mib(path: Path, report: HardwareReport, **params) -> float:
    """What the first device needs under these settings, with every device roomy (an RPC device has no
    CUDA context here, so the breakdown's default overhead is left out)."""
    bd = fit.memory_breakdown(read_file(path), fit.FitParams(n_ctx=CTX, **params),
                              [1e6] * max(1, len(report.usable_gpus)))
    return bd.gpus[0].total_mib - bd.gpus[0].overhead_mib


def margin_plus(mib: float) -> float:
    """Free memory that leaves `mib` usable after the planner's safety margin."""
    return fit.GPU_MARGIN_MIN_MIB + mib


async def load_planned(path: Path, report: HardwareReport, placement: DevicePlacement | None = None,
                       **params) -> tuple[fit.Plan, EngineStatus]:
    plan = fit.plan(read_file(path), report, fit.FitParams(n_ctx=CTX, **params))
    bd = plan.breakdown
    engine = Engine()
    try:
        await engine.load(LoadSpec(
            model_path=str(path), model_id=path.stem, n_ctx=bd.n_ctx, n_threads=1,
            kv_type=bd.kv_type_k, flash_attn=bd.flash_attn, chat_memory_mib=0,
            placement=placement or plan.placement()))
        return plan, engine.status()
    finally:
        await engine.close()


def assert_as_planned(plan: fit.Plan, status: EngineStatus, placement: DevicePlacement | None = None) -> None:
    placement = placement or plan.placement()
    planned = planning.planned_per_device(plan.to_dict())
    actual = Allocation.from_dict(status.allocation)
    assert compare(planned, actual) == [], (planned, status.allocation)
    named = set(placement.devices) | {HOST}
    assert set(actual.devices) <= named, f"buffers on devices the plan did not name: {status.allocation}"
    layers = status.allocation["layers"]
    for device, count in zip(placement.devices, placement.layers, strict=True):
        assert layers.get(device, 0) == count, (device, layers)
        weights = actual.devices[device].weights_mib
        assert abs(weights - planned[device]["weights_mib"]) <= WEIGHTS_TOLERANCE_MIB
    assert layers.get(HOST, 0) == plan.breakdown.n_layer + 1 - placement.n_gpu_layers


async def test_full_offload_lands_on_the_one_device(machine: HardwareReport, tiny_model: Path) -> None:
    report = with_free(machine, 4096)
    plan, status = await load_planned(tiny_model, report)
    assert plan.verdict == "full_gpu"
    assert plan.placement().devices == ["RPC0"]
    assert_as_planned(plan, status)
    assert status.allocation["layers"]["RPC0"] == plan.breakdown.n_layer + 1


async def test_layers_split_over_two_devices_as_planned(machine: HardwareReport, tiny_model: Path) -> None:
    report = with_free(machine, 4096, 2048)  # llama.cpp's rule: shares in proportion to free memory
    plan, status = await load_planned(tiny_model, report)
    placement = plan.placement()
    assert plan.verdict == "full_gpu"
    assert placement.devices == ["RPC0", "RPC1"] and all(placement.layers)
    assert_as_planned(plan, status)


async def test_partial_offload_keeps_the_first_layers_on_the_cpu(machine: HardwareReport,
                                                                tiny_model: Path) -> None:
    report = with_free(machine, margin_plus(0.6 * need_mib(tiny_model, machine)))
    plan, status = await load_planned(tiny_model, report)
    assert plan.verdict == "partial_gpu"
    assert 0 < plan.placement().n_gpu_layers < plan.breakdown.n_layer + 1
    assert_as_planned(plan, status)


async def test_experts_kept_in_ram_as_planned(machine: HardwareReport, moe_model: Path) -> None:
    full = need_mib(moe_model, machine)
    experts_out = need_mib(moe_model, machine, cpu_moe=True)
    report = with_free(machine, margin_plus((full + experts_out) / 2))
    plan, status = await load_planned(moe_model, report)
    placement = plan.placement()
    assert plan.verdict == "partial_gpu"
    assert placement.n_gpu_layers == plan.breakdown.n_layer + 1  # every layer offloaded ...
    assert 0 < placement.n_cpu_moe < plan.breakdown.n_layer  # ... but some layers' experts in RAM
    assert_as_planned(plan, status)


async def test_cpu_only_uses_no_offload_device_even_when_one_is_there(machine: HardwareReport,
                                                                      tiny_model: Path, rpc_servers) -> None:
    report = with_free(machine, margin_plus(0.001))  # not even one layer fits
    # The worker still registers the RPC server: llama.cpp would use it by default (a compute buffer for
    # large batches at least); the plan's empty device list must keep it out.
    cpu_only = DevicePlacement(rpc_servers=[rpc_servers[0].endpoint])
    plan, status = await load_planned(tiny_model, report, placement=cpu_only)
    assert plan.verdict == "cpu_only" and plan.placement().cpu_only
    assert_as_planned(plan, status, cpu_only)
    assert set(status.allocation["devices"]) == {HOST}


def test_status_shows_planned_beside_allocated_per_device(tmp_path: Path, models_dir: Path,
                                                          rpc_servers) -> None:
    """`serve --rpc HOST:PORT`: the bridge plans with the RPC server's device, llama.cpp loads what was
    planned, and the status shows both, per device, with the budget the plan used."""
    server = start_server(tmp_path, models_dir, "--model", "tiny-llama-Q8_0", "--ctx", "1024",
                          "--rpc", rpc_servers[0].endpoint)
    try:
        plan = server.status()["plan"]
        assert plan["placement"]["devices"] == ["RPC0"] and plan["verdict"] == "full_gpu"
        assert set(plan["planned"]) == {"RPC0", "CPU"}
        assert set(plan["actual"]["devices"]) == {"RPC0", "CPU"}
        assert plan["differences"] == []
        assert plan["actual"]["layers"]["RPC0"] == plan["n_layer"] + 1
        assert "no model is loaded" in plan["budget"]
        assert plan["loaded_use"]["ram_mib"] > 0  # measured from the worker, for the next plan
        hardware_report = server.get_json("/bridge/v1/hardware")
        assert [g["device"] for g in hardware_report["gpus"]] == ["RPC0"]
        # A swap is planned on what will be free once the loaded model is gone, and reloads on the same
        # RPC server (which serves one client at a time: the old worker is gone first).
        body = json.dumps({"ctx": 2048}).encode()
        request = urllib.request.Request(server.url + "/bridge/v1/load", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=60) as reply:
            swapped = json.loads(reply.read())["plan"]
        assert "once tiny-llama-Q8_0 is unloaded" in swapped["budget"]
        assert swapped["n_ctx"] == 2048 and swapped["differences"] == []
        assert swapped["actual"]["layers"]["RPC0"] == plan["n_layer"] + 1
    finally:
        server.stop()
