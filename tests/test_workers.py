"""One model across several machines: `st-bridge worker`s on 127.0.0.1 lend their CPU over llama.cpp's RPC
protocol, the planner places layers on the bridge's CPU and on both, and the split model writes what the
unsplit one writes. A worker that vanishes mid-reply ends it with an error naming it, and the bridge
reloads the model without it; a worker of another version is refused; a worker will not listen beyond
loopback without the explicit option."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge import fit
from bridge.engine.client import Engine
from bridge.engine.types import GenerationRequest, GenerationResult, LoadSpec, SamplingParams, TokenChunk
from bridge.gguf import read_file
from bridge.workers.info import INFO_PATH, info_port
from tests.fixtures.rpc import Worker, lent_for_split, start_worker
from tests.fixtures.server import REPO, BridgeServer, free_port, start_server

CTX = 1024
PROMPT = "Once upon a time the dragon said"
GREEDY = {"temperature": 0, "top_k": 1, "ignore_eos": True, "cache_prompt": False}


@pytest.fixture(scope="module")
def two_workers(tiny_model: Path) -> Iterator[list[Worker]]:
    memory = str(lent_for_split(tiny_model, CTX, workers=2))
    workers = [start_worker("--memory", memory), start_worker("--memory", memory)]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture(scope="module")
def split_bridge(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
                 two_workers: list[Worker]) -> Iterator[BridgeServer]:
    args = ["--model", "tiny-llama-Q8_0", "--ctx", str(CTX)]
    for worker in two_workers:
        args += ["--worker", worker.address]
    server = start_server(tmp_path_factory.mktemp("split"), models_dir, *args)
    try:
        yield server
    finally:
        server.stop()


def post(server: BridgeServer, path: str, body: dict[str, Any], method: str = "POST") -> Any:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


async def unsplit_tokens(model: Path, n: int) -> str:
    engine = Engine()
    try:
        await engine.load(LoadSpec(model_path=str(model), model_id="unsplit", n_ctx=CTX, n_threads=1,
                                   chat_memory_mib=0))
        req = GenerationRequest(prompt=PROMPT, max_tokens=n,
                                sampling=SamplingParams(temperature=0.0, top_k=1, ignore_eos=True))
        items = [item async for item in engine.generate(req)]
    finally:
        await engine.close()
    assert isinstance(items[-1], GenerationResult)
    return "".join(i.text for i in items if isinstance(i, TokenChunk))


def test_a_worker_beyond_loopback_needs_the_explicit_option() -> None:
    command = [sys.executable, "-m", "bridge", "worker", "--host", "10.213.0.1", "--port", "50999"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--trusted-network" in proc.stderr and "no authentication" in proc.stderr


def test_a_worker_says_what_rpc_cannot(two_workers: list[Worker]) -> None:
    import llama_cpp

    from bridge import __version__

    url = f"http://127.0.0.1:{info_port(two_workers[0].port)}{INFO_PATH}"
    with urllib.request.urlopen(url, timeout=10) as reply:
        info = json.loads(reply.read())
    assert info["version"] == __version__ and info["llama_cpp_version"] == llama_cpp.__version__
    [device] = info["devices"]
    assert device["kind"] == "cpu" and device["name"] == "CPU"  # RPC would call it a GPU
    assert device["total_mib"] == device["free_mib"] <= int(two_workers[0].process.args[-1])


async def test_a_model_split_three_ways_writes_what_the_unsplit_model_writes(
        split_bridge: BridgeServer, two_workers: list[Worker], tiny_model: Path) -> None:
    plan = split_bridge.status()["plan"]
    placement = plan["placement"]
    assert placement["devices"] == ["RPC0", "RPC1"] and all(placement["layers"])
    assert sum(placement["layers"]) < plan["n_layer"] + 1  # the rest stays on the bridge's CPU
    assert placement["rpc_servers"] == [w.address for w in two_workers]
    layers = plan["actual"]["layers"]
    assert layers["RPC0"] == placement["layers"][0] and layers["RPC1"] == placement["layers"][1]
    assert layers["CPU"] == plan["n_layer"] + 1 - sum(placement["layers"])
    assert plan["differences"] == []
    predicted = split_bridge.status()["speed"]["predicted"]["devices"]
    network = {d["device"]: d.get("network_ms_per_token", 0) for d in predicted}
    assert network["RPC0"] > 0 and network["RPC1"] > 0 and network["CPU"] == 0  # measured once per worker
    workers = split_bridge.get_json("/bridge/v1/workers")["workers"]
    states = [(w["state"], w["in_use"], w["devices"][0]["kind"]) for w in workers]
    assert states == [("ready", True, "cpu")] * 2

    body = {"prompt": PROMPT, "n_predict": 24, **GREEDY}
    async with aiohttp.ClientSession(split_bridge.url) as http, http.post("/completion", json=body) as reply:
        split_text = (await reply.json())["content"]
    assert split_text == await unsplit_tokens(tiny_model, 24)


async def test_a_worker_of_another_version_is_refused(split_bridge: BridgeServer) -> None:
    """Its info endpoint answers with another version (what an older `st-bridge worker` would say)."""
    port = free_port()

    async def old_worker(_request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.9", "llama_cpp_version": "0.3.20", "rpc_port": port,
                                  "devices": [{"name": "CUDA0", "description": "RTX 3060", "kind": "gpu",
                                               "total_mib": 12288, "free_mib": 12000}]})

    app = web.Application()
    app.router.add_get(INFO_PATH, old_worker)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", info_port(port)).start()
    try:
        # (from a thread: this test's event loop serves the old worker's endpoint meanwhile)
        body = {"address": f"127.0.0.1:{port}"}
        added = await asyncio.to_thread(post, split_bridge, "/bridge/v1/workers", body)
        assert added["state"] == "refused"
        assert "st-bridge 0.0.9 with llama-cpp-python 0.3.20" in added["message"]
        assert "this bridge st-bridge 0.1.0" in added["message"]
        hardware = split_bridge.get_json("/bridge/v1/hardware")
        assert f"127.0.0.1:{port}" not in json.dumps(hardware["gpus"])  # never planned with
        post(split_bridge, f"/bridge/v1/workers/127.0.0.1:{port}", {}, method="DELETE")
    finally:
        await runner.cleanup()


async def test_a_worker_lost_mid_reply_ends_it_with_its_name_and_the_model_reloads_without_it(
        split_bridge: BridgeServer, two_workers: list[Worker]) -> None:
    doomed = two_workers[1]
    async with aiohttp.ClientSession(split_bridge.url) as http:
        body = {"prompt": PROMPT, "n_predict": 4000, "stream": True, **GREEDY}
        async with http.post("/completion", json=body) as reply:
            events = []
            async for line in reply.content:
                if line.startswith(b"data: "):
                    events.append(line.decode())
                    if len(events) == 5:
                        doomed.kill()
            last = events[-1]
    assert doomed.address in last and "stopped answering" in last, last
    status = split_bridge.wait_for(("ready",), timeout=120)
    deadline = time.monotonic() + 60
    survivor = [two_workers[0].address]
    while status["plan"]["placement"]["rpc_servers"] != survivor and time.monotonic() < deadline:
        time.sleep(0.2)
        status = split_bridge.status()
    plan = status["plan"]
    assert plan["placement"]["rpc_servers"] == [two_workers[0].address]
    assert plan["differences"] == [] and "RPC1" not in plan["actual"]["devices"]
    workers = {w["address"]: w for w in split_bridge.get_json("/bridge/v1/workers")["workers"]}
    assert workers[doomed.address]["state"] == "unreachable"
    assert "stopped answering" in workers[doomed.address]["message"]
    body = {"prompt": PROMPT, "n_predict": 4, **GREEDY}
    async with aiohttp.ClientSession(split_bridge.url) as http, http.post("/completion", json=body) as reply:
        assert reply.status == 200 and (await reply.json())["content"]  # and it serves again


def test_hardware_and_fit_count_a_worker(two_workers: list[Worker], tiny_model: Path) -> None:
    worker = two_workers[0]
    run = [sys.executable, "-m", "bridge"]
    report = json.loads(subprocess.run([*run, "hardware", "--json", "--worker", worker.address], cwd=REPO,
                                       capture_output=True, text=True, timeout=120, check=True).stdout)
    [gpu] = report["gpus"]
    assert gpu["rpc_endpoint"] == worker.address and gpu["kind"] == "cpu" and gpu["device"] == "RPC0"
    plan = json.loads(subprocess.run([*run, "fit", str(tiny_model), "--ctx", str(CTX), "--json", "--worker",
                                      worker.address], cwd=REPO, capture_output=True, text=True, timeout=120,
                                     check=True).stdout)
    assert plan["devices"][0]["device"] == "RPC0" and plan["gpu_layers"] > 0
    gone = subprocess.run([*run, "hardware", "--json", "--worker", "127.0.0.1:1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(gone.stdout)["gpus"] == [] and "does not answer" in gone.stderr


def test_the_output_layer_stays_on_this_machine_when_the_last_device_is_remote(tiny_model: Path) -> None:
    """llama.cpp gives the output layer to the last device; across a network that would send the logits
    (n_vocab floats) over it every token, so the plan keeps the output layer here."""
    from bridge.hardware import CPUInfo, GPUInfo, HardwareReport

    def machine(endpoint: str) -> HardwareReport:
        worker = GPUInfo(index=0, name="RTX 3060 on " + endpoint, total_mib=12288, free_mib=12000,
                         used_mib=288,
                         device="RPC0", rpc_endpoint=endpoint)
        return HardwareReport(cpu=CPUInfo("cpu", 8, 16, True, False), ram_total_mib=32000,
                              ram_available_mib=20000, swap_total_mib=0, swap_free_mib=0, gpus=[worker])

    n_layer = fit.ModelLayout.from_header(read_file(tiny_model)).info.n_layer
    remote = fit.plan(read_file(tiny_model), machine("192.168.1.20:50052"), fit.FitParams(n_ctx=CTX))
    assert remote.placement().layers == [n_layer] and remote.verdict == "partial_gpu"
    here = fit.plan(read_file(tiny_model), machine("127.0.0.1:50052"), fit.FitParams(n_ctx=CTX))
    assert here.placement().layers == [n_layer + 1] and here.verdict == "full_gpu"
