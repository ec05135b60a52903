"""The ST panel's catalog calls over HTTP: recommend, quants, downloads with progress events, cancel."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

from bridge import cli
from bridge.api import BUS_KEY
from bridge.api.app import create_app
from bridge.api.catalog_routes import DOWNLOADS_KEY, add_routes
from bridge.config import Settings
from tests.fixtures.hub import Misbehaviour
from tests.fixtures.server import FakeEngine

REPO = "brittlewis12/Kunoichi-DPO-v2-7B-GGUF"
FILE = "kunoichi-dpo-v2-7b.Q6_K.gguf"
SIZE = 4 << 20
JSON = {"Content-Type": "application/json"}


@pytest.fixture(autouse=True)
def small_read_chunks(monkeypatch):
    # huggingface_hub hands progress over per 10 MiB read; these test files are a few MiB.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256 << 10)


@pytest.fixture
async def bridge(aiohttp_client: Any, fake_hub: Any, tmp_path, monkeypatch) -> Any:
    """An in-process bridge with the catalog routes, its Hub the fake one; (client, hub, settings)."""
    monkeypatch.setenv("ST_BRIDGE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    fake_hub.add_file(REPO, FILE, b"GGUF" + os.urandom(SIZE - 4), tmp_dir=tmp_path / "hub")
    settings = Settings(data_dir=tmp_path / "data", catalog_refresh=False)  # test_catalog_refresh.py does it
    app = create_app(settings, engine=FakeEngine())
    add_routes(app)  # a no-op once the app factory adds them itself
    client = await aiohttp_client(app)
    return client, fake_hub, settings


async def events_until(sub: Any, name: str, timeout: float = 20) -> list[Any]:
    seen = []
    while True:
        event = await sub.next(timeout)
        assert event is not None, f"no {name} event; saw {[e.name for e in seen]}"
        seen.append(event)
        if event.name == name:
            return seen


async def test_recommend_answers_the_same_json_as_the_command(bridge, capsys):
    client, _, settings = bridge
    resp = await client.get("/bridge/v1/recommend", params={"gpu_mib": "0", "ram_mib": "16384", "limit": "5"})
    assert resp.status == 200
    over_http = await resp.json()
    code = cli.main(
        ["recommend", "--json", "--gpu-mib", "0", "--ram-mib", "16384", "--limit", "5",
         "--data-dir", str(settings.data_dir)]
    )  # fmt: skip
    assert code == 0
    assert over_http == json.loads(capsys.readouterr().out)
    best = over_http["best"]
    assert best["verdict"] == "cpu_only" and best["reason"].startswith("best pick")
    assert len(over_http["candidates"]) == 5 and over_http["left_out"]


async def test_recommend_refuses_bad_numbers(bridge):
    client, _, _ = bridge
    resp = await client.get("/bridge/v1/recommend", params={"ctx": "lots"})
    assert resp.status == 400
    assert "ctx must be a whole number" in (await resp.json())["error"]["message"]


async def test_catalog_lists_the_bundled_models(bridge):
    client, _, _ = bridge
    data = await (await client.get("/bridge/v1/catalog")).json()
    assert data["origin"] == "bundled" and any(m["repo"] == REPO for m in data["models"])


async def test_quants_of_a_local_model_say_which_are_here_and_which_fit(bridge):
    client, _, settings = bridge
    local = settings.models_path / REPO / FILE
    local.parent.mkdir(parents=True)
    local.write_bytes(b"GGUF")
    model_id = f"{REPO}/{FILE.removesuffix('.gguf')}"
    resp = await client.get(f"/bridge/v1/models/{model_id}/quants")
    assert resp.status == 200
    data = await resp.json()
    assert data["repo"] == REPO
    by_quant = {q["quant"]: q for q in data["quants"]}
    assert by_quant["Q6_K"]["local"] and by_quant["Q6_K"]["local_id"] == model_id
    assert not by_quant["Q4_K_M"]["local"]
    assert all(q["badge"] and q["verdict"] for q in data["quants"])
    assert data["best"] in by_quant
    missing = await client.get("/bridge/v1/models/nobody/nothing/quants")
    assert missing.status == 404

    # A model of the folder from no catalog repository: no other quants, and a note that says why.
    (settings.models_path / "mine-Q8_0.gguf").write_bytes(b"GGUF")
    resp = await client.get("/bridge/v1/models/mine-Q8_0/quants")
    assert resp.status == 200
    data = await resp.json()
    assert data["repo"] is None and data["quants"] == [] and "not from a catalog repository" in data["note"]


async def test_a_download_sends_progress_events_and_lands_in_the_models_dir(bridge):
    client, hub, settings = bridge
    hub.throttle_bps = 8 << 20
    sub = client.app[BUS_KEY].subscribe()
    resp = await client.post("/bridge/v1/downloads", json={"repo": REPO, "quant": "Q6_K"}, headers=JSON)
    assert resp.status == 202
    started = await resp.json()
    seen = await events_until(sub, "download_done")
    progress = [e.data for e in seen if e.name == "download_progress"]
    assert progress and all(p["id"] == started["id"] for p in progress)
    assert any(0 < p["bytes_done"] < SIZE and p["rate_bps"] > 0 for p in progress)
    assert (settings.models_path / REPO / FILE).stat().st_size == SIZE
    listed = await (await client.get("/bridge/v1/downloads")).json()
    assert listed["downloads"][0]["state"] == "done" and listed["downloads"][0]["bytes_done"] == SIZE
    # The finished file is a local model now, and can be deleted by its id.
    model_id = f"{REPO}/{FILE.removesuffix('.gguf')}"
    deleted = await client.delete(f"/bridge/v1/models/{model_id}", headers=JSON)
    assert deleted.status == 200 and not (settings.models_path / REPO / FILE).exists()


async def test_cancel_stops_the_download_and_removes_partial_data(bridge):
    client, hub, settings = bridge
    key = f"{REPO}/{FILE}"
    hub.misbehave[key] = Misbehaviour(pause_after=SIZE // 3)
    sub = client.app[BUS_KEY].subscribe()
    resp = await client.post("/bridge/v1/downloads", json={"repo": REPO, "file": FILE}, headers=JSON)
    download = await resp.json()
    assert await asyncio.to_thread(hub.misbehave[key].paused.wait, 10)
    cancel = await client.delete(f"/bridge/v1/downloads/{download['id']}", headers=JSON)
    assert cancel.status == 200
    hub.misbehave[key].resume.set()
    await events_until(sub, "download_cancelled")
    assert client.app[DOWNLOADS_KEY].get(download["id"]).state == "cancelled"
    folder = settings.models_path / REPO
    assert not any(p.suffix in (".gguf", ".incomplete") for p in folder.iterdir())


async def test_a_failed_download_is_an_error_event(bridge):
    client, hub, _ = bridge
    hub.misbehave[f"{REPO}/{FILE}"] = Misbehaviour(corrupt=True)
    sub = client.app[BUS_KEY].subscribe()
    await client.post("/bridge/v1/downloads", json={"repo": REPO, "quant": "Q6_K"}, headers=JSON)
    seen = await events_until(sub, "download_error")
    assert "corrupt" in seen[-1].data["error"]


async def test_bad_download_requests_get_clear_errors(bridge):
    client, _, _ = bridge
    resp = await client.post("/bridge/v1/downloads", json={"quant": "Q6_K"}, headers=JSON)
    assert resp.status == 400 and "repo" in (await resp.json())["error"]["message"]
    resp = await client.post("/bridge/v1/downloads", json={"repo": REPO, "quant": "Q9_9"}, headers=JSON)
    assert resp.status == 404 and "no Q9_9 file" in (await resp.json())["error"]["message"]
    resp = await client.delete("/bridge/v1/models/../../etc/passwd", headers=JSON)
    assert resp.status in (400, 404)
    resp = await client.delete("/bridge/v1/downloads/999", headers=JSON)
    assert resp.status == 404
