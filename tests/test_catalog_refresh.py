"""The catalog refreshes itself while serving: in the background when the Hub answers and the cache is stale,
never when it is fresh, silently not at all offline; trusted uploaders' repositories are discovered."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import Any

import pytest

from bridge import catalog
from bridge.api import BUS_KEY
from bridge.api.app import create_app
from bridge.api.catalog_routes import REFRESH_KEY
from bridge.config import Settings
from bridge.hub import HubClient
from tests.fixtures.hub import Misbehaviour
from tests.fixtures.server import FakeEngine, free_port

KUNOICHI = "brittlewis12/Kunoichi-DPO-v2-7B-GGUF"
Q6_K = "kunoichi-dpo-v2-7b.Q6_K.gguf"
FOUND = "bartowski/Found-7B-Instruct-GGUF"
FOUND_FILE = "Found-7B-Instruct-Q4_K_M.gguf"
DAY_S = 24 * 3600


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    monkeypatch.setenv("ST_BRIDGE_CONFIG", str(tmp_path / "no-config.toml"))
    return Settings(data_dir=tmp_path / "data", catalog_refresh=True, trusted_uploaders=["bartowski"])


def cache_aged(settings: Settings, age_s: float) -> None:
    """A cached catalog (the bundled figures) written `age_s` ago."""
    bundled = catalog.bundled()
    old = catalog.Catalog(bundled.models, origin="hub", refreshed_at=time.time() - age_s)
    catalog.save_cache(old, settings.data_dir)


def kunoichi_q6k(data: dict[str, Any]) -> dict[str, Any]:
    model = next(m for m in data["models"] if m["repo"] == KUNOICHI)
    return next(f for f in model["files"] if f["quant"] == "Q6_K")


async def start(aiohttp_client: Any, settings: Settings) -> tuple[Any, Any]:
    """(client, subscription): the bus is subscribed before the app starts, so no event is missed."""
    app = create_app(settings, engine=FakeEngine())
    sub = app[BUS_KEY].subscribe()
    return await aiohttp_client(app), sub


async def next_named(sub: Any, name: str, timeout: float = 20) -> Any:
    while (event := await sub.next(timeout)) is not None:
        if event.name == name:
            return event
    raise AssertionError(f"no {name} event within {timeout} s")


async def test_offline_serve_keeps_the_bundled_catalog(aiohttp_client, settings, monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    caplog.set_level(logging.INFO, logger="bridge.api.catalog_routes")
    client, _ = await start(aiohttp_client, settings)
    await asyncio.wait_for(client.app[REFRESH_KEY], 10)
    data = await (await client.get("/bridge/v1/catalog")).json()
    assert data["origin"] == "bundled" and kunoichi_q6k(data)["parts"][0]["sha256"] is None
    said = [r.getMessage() for r in caplog.records if r.name == "bridge.api.catalog_routes"]
    assert len(said) == 1 and "cannot be reached" in said[0] and "bundled" in said[0]
    rec = await client.get("/bridge/v1/recommend", params={"gpu_mib": "0", "ram_mib": "16384"})
    assert rec.status == 200 and (await rec.json())["best"]
    assert not (settings.data_dir / catalog.CACHE_NAME).exists()


async def test_stale_cache_is_refreshed_in_the_background(
    aiohttp_client, settings, fake_hub, sparse_model, tmp_path
):
    weights = b"GGUF" + os.urandom((1 << 20) - 4)
    fake_hub.add_file(KUNOICHI, Q6_K, weights, tmp_dir=tmp_path / "hub")
    fake_hub.add_file(FOUND, FOUND_FILE, sparse_model("mistral-7b"), sha256="cd" * 32)
    fake_hub.misbehave[f"{FOUND}/{FOUND_FILE}"] = held = Misbehaviour(pause_after=1000)
    cache_aged(settings, 2 * DAY_S)

    client, sub = await start(aiohttp_client, settings)
    # The refresh is under way (held at the discovered model's header) and the server answers meanwhile.
    assert await asyncio.to_thread(held.paused.wait, 15)
    started = time.monotonic()
    during = await (await client.get("/bridge/v1/catalog")).json()
    assert time.monotonic() - started < 2
    assert kunoichi_q6k(during)["parts"][0]["sha256"] is None  # still the stale figures

    held.resume.set()
    event = await next_named(sub, "catalog_updated")
    assert event.data["discovered"] == [FOUND]
    data = await (await client.get("/bridge/v1/catalog")).json()
    part = kunoichi_q6k(data)["parts"][0]
    assert part["sha256"] == hashlib.sha256(weights).hexdigest() and part["size_bytes"] == len(weights)
    assert part["size_tolerance_bytes"] == 0
    found = next(m for m in data["models"] if m["repo"] == FOUND)
    assert found["source"] == "discovered" and found["files"][0]["quant"] == "Q4_K_M"
    assert 7.0 < found["params_b"] < 7.5 and found["shape"]["n_layer"] == 32  # from its header
    assert data["refreshed_at"] > time.time() - 60
    # Only the Hub's file list and one header of the discovered model were fetched: no weights.
    assert fake_hub.served(KUNOICHI, Q6_K) == 0


async def test_fresh_cache_is_not_refetched(aiohttp_client, settings, fake_hub, tmp_path):
    fake_hub.add_file(KUNOICHI, Q6_K, b"GGUF" + os.urandom(1000), tmp_dir=tmp_path / "hub")
    cache_aged(settings, DAY_S / 2)
    client, _ = await start(aiohttp_client, settings)
    await asyncio.wait_for(client.app[REFRESH_KEY], 10)
    assert fake_hub.requests == []
    data = await (await client.get("/bridge/v1/catalog")).json()
    assert kunoichi_q6k(data)["parts"][0]["sha256"] is None


async def test_refresh_can_be_turned_off(aiohttp_client, settings, fake_hub):
    client, _ = await start(aiohttp_client, settings.model_copy(update={"catalog_refresh": False}))
    assert REFRESH_KEY not in client.app
    await asyncio.sleep(0.2)
    assert fake_hub.requests == []


def test_discovery_adds_an_uploaders_most_downloaded_gguf_repositories(fake_hub, sparse_model, tmp_path):
    mistral = sparse_model("mistral-7b")
    for name, downloads in (("Popular-7B", 900), ("Middling-7B", 50), ("Obscure-7B", 3)):
        repo = f"mradermacher/{name}-GGUF"
        fake_hub.add_file(repo, f"{name}.Q4_K_M.gguf", mistral, sha256="ef" * 32)
        fake_hub.downloads[repo] = downloads
    fake_hub.add_file("mradermacher/Weights-7B", "model.safetensors", b"{}", tmp_dir=tmp_path)
    fake_hub.authors_tags["mradermacher/Weights-7B"] = ["safetensors"]
    fake_hub.downloads["mradermacher/Weights-7B"] = 10_000
    fake_hub.add_file("someone/Else-7B-GGUF", "Else-7B.Q4_K_M.gguf", mistral, sha256="ef" * 32)

    bundled = catalog.bundled()
    cat = catalog.refresh(
        bundled, HubClient(endpoint=fake_hub.endpoint), read_headers=False, repos=None,
        authors=["mradermacher"], per_author=2,
    )  # fmt: skip
    found = [m for m in cat.models if m.source == "discovered"]
    assert [m.repo for m in found] == ["mradermacher/Popular-7B-GGUF", "mradermacher/Middling-7B-GGUF"]
    assert all(m.files[0].exact and m.shape.complete and not m.params_estimated for m in found)
    # Bundled models the Hub did not answer for keep their figures; none is lost.
    assert {m.repo for m in bundled.models} <= {m.repo for m in cat.models}
    listed = [path for method, path, _ in fake_hub.requests if path.startswith("/api/models?")]
    assert listed and all("filter=gguf" in p and "sort=downloads" in p for p in listed)


def test_catalog_refresh_command_saves_the_cache_and_lists_discovered_models(
    fake_hub, sparse_model, tmp_path, monkeypatch, capsys
):
    from bridge import cli

    monkeypatch.setenv("ST_BRIDGE_CONFIG", str(tmp_path / "no-config.toml"))
    fake_hub.add_file(FOUND, FOUND_FILE, sparse_model("mistral-7b"), sha256="cd" * 32)
    data_dir = tmp_path / "data"
    code = cli.main(["catalog", "refresh", "--author", "bartowski", "--no-headers",
                     "--data-dir", str(data_dir)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr()
    assert f"{FOUND}" in out.out and "[discovered]" in out.out and "catalog: hub" in out.out
    assert "catalog updated" in out.err
    assert catalog.load(data_dir).get(FOUND).source == "discovered"
    assert not catalog.is_stale(data_dir)
