"""Companions in the memory budget: plans against what llama.cpp allocates, and refusals before any load
when the chat model and its companions do not fit together."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import hardware
from bridge.api import MANAGER_KEY
from bridge.api.app import create_app
from bridge.companions import plans
from bridge.companions.embedding_worker import EmbeddingRunner, EmbeddingSpec
from bridge.config import Settings
from bridge.errors import NotEnoughMemory
from bridge.gguf import read_file
from tests.fixtures.server import FakeEngine

VISION_MODEL = "tiny/vision-llama/vision-llama-Q8_0"
PROJECTOR = "tiny/vision-llama/mmproj-vision-llama-F32"


@pytest.mark.parametrize("fixture", ["bert_embedder", "decoder_embedder"])
def test_an_embedding_plan_covers_what_llama_cpp_allocates(request, fixture):
    path: Path = request.getfixturevalue(fixture)
    plan = plans.plan_embedding(read_file(path), "x", 512)
    runner = EmbeddingRunner(EmbeddingSpec(str(path), "x", n_ctx=512))
    try:
        actual = runner.allocation.devices["CPU"]
    finally:
        runner.close()
    allocated = actual.weights_mib + actual.kv_mib + actual.compute_mib
    assert allocated <= plan.total_mib <= 2 * allocated + 1, (plan, actual)
    assert abs(plan.weights_mib - actual.weights_mib) < 0.1


_real_probe = hardware.probe


def _what_if(ram_mib: int) -> hardware.HardwareReport:
    """This machine with no GPU and `ram_mib` of RAM available."""
    return hardware.what_if(_real_probe(), [0], ram_mib)


def _least_ram(fits) -> int:
    lo, hi = 256, 64 * 1024
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@pytest.fixture
def app(tmp_path, monkeypatch, companion_models_dir):
    monkeypatch.setenv("ST_BRIDGE_CONFIG", str(tmp_path / "no-config.toml"))
    engine = FakeEngine()
    app = create_app(Settings(data_dir=tmp_path, models_dir=companion_models_dir, catalog_refresh=False),
                     engine=engine)
    return app, engine


def _ram_where_only_the_chat_model_fits(manager, monkeypatch, model: Path) -> int:
    header = read_file(model)

    def fits(ram: int) -> bool:
        monkeypatch.setattr(hardware, "probe", lambda: _what_if(ram))
        try:
            manager._plan(header, {"ctx": 512})  # no path: no projector
            return True
        except NotEnoughMemory:
            return False

    return _least_ram(fits)


async def test_a_chat_model_and_its_projector_that_do_not_fit_together_are_refused_before_loading(
    app, aiohttp_client, monkeypatch, companion_models_dir
):
    app, engine = app
    client = await aiohttp_client(app)
    manager = app[MANAGER_KEY]
    model = companion_models_dir / f"{VISION_MODEL}.gguf"
    ram = _ram_where_only_the_chat_model_fits(manager, monkeypatch, model)
    monkeypatch.setattr(hardware, "probe", lambda: _what_if(ram))
    manager.companions.set_vision(model, PROJECTOR)  # the user asked for this projector
    reply = await client.post("/bridge/v1/load", json={"model": VISION_MODEL, "ctx": 512})
    body = await reply.json()
    assert reply.status == 507, body
    message = body["error"]["message"]
    assert "does not fit" in message and f"vision projector {PROJECTOR}" in message, message
    assert engine.loads == []  # refused before anything loaded

    manager.companions.set_vision(model, "auto")  # paired by itself: left out, and said so
    reply = await client.post("/bridge/v1/load", json={"model": VISION_MODEL, "ctx": 512})
    assert reply.status == 200, await reply.json()
    assert engine.loads[-1].mmproj_path is None
    note = manager.status_dict()["companions"]["vision"]["note"]
    assert "left out" in note and PROJECTOR in note

    monkeypatch.setattr(hardware, "probe", lambda: _what_if(ram + 64))  # room for both
    reply = await client.post("/bridge/v1/load", json={"model": VISION_MODEL, "ctx": 512})
    assert reply.status == 200
    assert engine.loads[-1].mmproj_path.endswith("mmproj-vision-llama-F32.gguf")
    assert manager.status_dict()["plan"]["companions"][0]["role"] == "vision"


async def test_an_embedding_model_that_does_not_fit_says_so_before_loading(app, aiohttp_client, monkeypatch):
    app, _ = app
    client = await aiohttp_client(app)
    monkeypatch.setattr(hardware, "probe", lambda: _what_if(512))  # all of it the RAM margin
    reply = await client.post("/bridge/v1/companions/embedding", json={"model": "embed/bge-tiny-en-F32"})
    body = await reply.json()
    assert reply.status == 507 and "the embedding model embed/bge-tiny-en-F32 does not fit" in \
        body["error"]["message"], body
    assert app[MANAGER_KEY].companions.embedder.state == "empty"  # no worker was started


async def test_chat_models_are_planned_on_what_a_running_embedding_model_leaves(app, aiohttp_client,
                                                                                 monkeypatch):
    app, _ = app
    client = await aiohttp_client(app)
    reply = await client.post("/bridge/v1/companions/embedding", json={"model": "embed/bge-tiny-en-F32"})
    assert reply.status == 200, await reply.json()
    try:
        status = await (await client.get("/bridge/v1/companions")).json()
        assert status["embedding"]["state"] == "ready" and status["embedding"]["plan"]["device"] == "CPU"
        assert [e["id"] for e in status["local"]["embedding"]] == ["embed/Qwen3-Embedding-tiny-F16",
                                                                   "embed/bge-tiny-en-F32"]
        projector = status["local"]["projectors"][0]
        assert projector["id"] == PROJECTOR and projector["paired_with"] == [VISION_MODEL]
    finally:
        await app[MANAGER_KEY].companions.close()
