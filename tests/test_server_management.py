"""The management API on a real bridge: hardware, status, the models dir, load / unload with the plan used,
events (snapshot first), starting without a model, remembering the last one, and a corrupt file."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.fixtures.server import st_model_name

LADDER_IDS = ["tiny-llama-Q4_K_M", "tiny-llama-Q5_K_M", "tiny-llama-Q6_K", "tiny-llama-Q8_0"]


async def test_hardware_status_and_models(bridge_server):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.get("/bridge/v1/hardware") as reply:
            hardware = await reply.json()
        async with http.get("/bridge/v1/status") as reply:
            status = await reply.json()
        async with http.get("/bridge/v1/models") as reply:
            models = await reply.json()
    assert hardware["ram_total_mib"] > 0 and hardware["cpu"]
    assert status["state"] == "ready" and status["model"] == "tiny-llama-Q8_0" and status["n_ctx"] == 1024
    assert status["hint"] is None and status["plan"]["n_ctx"] == 1024
    ids = [m["id"] for m in models["models"]]
    assert [i for i in ids if i in LADDER_IDS] == LADDER_IDS
    loaded = [m for m in models["models"] if m["loaded"]]
    assert [m["id"] for m in loaded] == ["tiny-llama-Q8_0"] and loaded[0]["quant"] == "Q8_0"
    assert all(m["fit"]["verdict"] in ("full_gpu", "partial_gpu", "cpu_only") for m in models["models"])
    assert status["plan"]["verdict"] == loaded[0]["fit"]["verdict"] and status["plan"]["reason"]


async def test_load_unload_and_events(start_bridge):
    server = start_bridge("--model", "tiny-llama-Q8_0")
    async with aiohttp.ClientSession(server.url) as http:
        events = await http.get("/bridge/v1/events")
        first = await _next_event(events)
        assert first["event"] == "status" and first["data"]["state"] == "ready"  # the snapshot comes first
        async with http.post("/bridge/v1/load", json={"model": "tiny-llama-Q4_K_M", "ctx": 512}) as reply:
            assert reply.status == 200, await reply.text()
            loaded = await reply.json()
        assert loaded["model"] == "tiny-llama-Q4_K_M" and loaded["plan"]["n_ctx"] == 512
        seen = [await _next_event(events) for _ in range(3)]
        assert "loading" in [e["event"] for e in seen] or "load_started" in [e["event"] for e in seen]
        async with http.get("/v1/models") as reply:
            assert st_model_name(await reply.json()) == "tiny-llama-Q4_K_M"
        async with http.post("/bridge/v1/unload", json={}) as reply:
            assert (await reply.json())["state"] == "empty"
        async with http.get("/v1/models") as reply:
            assert reply.status == 200 and (await reply.json())["data"] == []
        events.close()


async def _next_event(response: aiohttp.ClientResponse) -> dict:
    while True:
        block = (await asyncio.wait_for(response.content.readuntil(b"\n\n"), 30)).decode()
        if block.startswith(":"):
            continue
        lines = dict(line.split(": ", 1) for line in block.strip().splitlines())
        return {"event": lines.get("event"), "data": json.loads(lines["data"])}


async def test_starts_without_a_model_and_says_how_to_get_one(start_bridge, tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    server = start_bridge(models=empty, wait=("empty",))
    status = server.status()
    assert status["state"] == "empty" and str(empty) in status["hint"]
    assert "no model is loaded" in server.log()
    async with aiohttp.ClientSession(server.url) as http:
        async with http.get("/v1/models") as reply:
            assert reply.status == 200 and st_model_name(await reply.json()) == "Valid"
        async with http.get("/health") as reply:
            assert reply.status in (502, 503)
        async with http.post("/v1/completions", json={"prompt": "hi"}) as reply:
            assert reply.status == 502
            assert "no model is loaded" in (await reply.json())["error"]["message"]
        async with http.post("/bridge/v1/load", json={"model": "nothing-here"}) as reply:
            assert reply.status == 404


def test_serves_a_file_and_remembers_it(start_bridge, tmp_path, tiny_models):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "my-model.gguf").write_bytes(tiny_models["Q6_K"].read_bytes())
    first = start_bridge("--model", str(elsewhere / "my-model.gguf"))  # a file outside the models dir
    assert first.status()["model"] == "my-model"
    first.stop()
    second = start_bridge("--data-dir", str(first.data_dir))  # no --model: the last one used
    assert second.status()["model"] == "my-model"


async def test_corrupt_model_fails_to_load_and_the_server_lives_on(start_bridge, tmp_path, models_dir):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    good = (models_dir / "tiny-llama-Q4_K_M.gguf").read_bytes()
    (mixed / "good.gguf").write_bytes(good)
    (mixed / "broken-header.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    (mixed / "broken-tensors.gguf").write_bytes(good[: len(good) // 2])  # header fine, tensor data cut off
    server = start_bridge("--model", "good", models=mixed)
    async with aiohttp.ClientSession(server.url) as http:
        for broken in ("broken-header", "broken-tensors"):
            async with http.post("/bridge/v1/load", json={"model": broken}) as reply:
                body = await reply.json()
                assert reply.status in (422, 502), body
                assert broken in body["error"]["message"] or "GGUF" in body["error"]["message"]
            async with http.get("/v1/models") as reply:
                assert reply.status == 200
        async with http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}) as reply:
            assert reply.status == 200  # the good model is still (or again) there
        async with http.post("/bridge/v1/load", json={"model": "good"}) as reply:
            assert reply.status == 200
    assert server.status()["state"] == "ready"


async def test_load_body_is_checked(bridge_server):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.post("/bridge/v1/load", json={"model": "tiny-llama-Q8_0", "kv_type": "q3"}) as reply:
            assert reply.status == 400 and "kv_type" in (await reply.json())["error"]["message"]
        async with http.post("/bridge/v1/load", json={"modle": "x"}) as reply:
            assert reply.status == 400
