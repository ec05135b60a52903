"""The models list follows the models dir on a real bridge: files added (sub-folders too) and removed show
up in `GET /bridge/v1/models` and as one `models_changed` event within a few seconds; partial downloads
(`*.incomplete`) never do."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import aiohttp

from tests.fixtures import companion_models
from tests.test_hot_swap import Events, watching

DEADLINE_S = 5.0


async def listed(http: aiohttp.ClientSession) -> list[str]:
    async with http.get("/bridge/v1/models") as reply:
        assert reply.status == 200
        return [m["id"] for m in (await reply.json())["models"]]


async def wait_listed(http: aiohttp.ClientSession, expected: list[str]) -> float:
    """Seconds until the list is `expected`; fails after DEADLINE_S."""
    started = time.monotonic()
    while (ids := await listed(http)) != expected:
        assert time.monotonic() - started < DEADLINE_S, f"still {ids}, expected {expected}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def changed(events: Events, start: int) -> dict:
    return events.seen[await events.wait_for("models_changed", start)]["data"]


async def test_added_and_removed_files_show_up_within_seconds(
    start_bridge, tmp_path: Path, models_dir: Path
) -> None:
    own = tmp_path / "models"
    own.mkdir()
    shutil.copyfile(models_dir / "tiny-llama-Q8_0.gguf", own / "tiny-llama-Q8_0.gguf")
    server = start_bridge("--model", "tiny-llama-Q8_0", "--ctx", "512", models=own)
    async with aiohttp.ClientSession(server.url) as http, watching(http) as events:
        assert await listed(http) == ["tiny-llama-Q8_0"]

        # A download in progress, then a finished file moved into place as the download manager does.
        partial = own / "other-Q4_K_M.gguf.incomplete"
        shutil.copyfile(models_dir / "tiny-llama-Q4_K_M.gguf", partial)
        start = len(events.seen)
        (own / "later").mkdir()
        shutil.copyfile(models_dir / "tiny-llama-Q6_K.gguf", own / "later" / "tiny-llama-Q6_K.gguf")
        await wait_listed(http, ["later/tiny-llama-Q6_K", "tiny-llama-Q8_0"])
        first = await changed(events, start)
        assert first["added"] == ["later/tiny-llama-Q6_K"] and first["removed"] == []

        start = len(events.seen)
        partial.rename(own / "other-Q4_K_M.gguf")
        await wait_listed(http, ["later/tiny-llama-Q6_K", "other-Q4_K_M", "tiny-llama-Q8_0"])
        assert (await changed(events, start))["added"] == ["other-Q4_K_M"]

        # A vision projector is no model of its own, yet its arrival is news: the panel offers it.
        start = len(events.seen)
        shutil.copyfile(companion_models.tiny_mmproj(), own / "later" / "mmproj-tiny-llama-F32.gguf")
        news = await changed(events, start)
        assert news["added"] == ["later/mmproj-tiny-llama-F32"] and news["projectors"] == news["added"]
        assert "later/mmproj-tiny-llama-F32" not in news["models"]

        start = len(events.seen)
        shutil.rmtree(own / "later")
        (own / "other-Q4_K_M.gguf").unlink()
        await wait_listed(http, ["tiny-llama-Q8_0"])
        removed: set[str] = set()
        gone = {"later/tiny-llama-Q6_K", "later/mmproj-tiny-llama-F32", "other-Q4_K_M"}
        while removed != gone:  # one event, or two close together
            index = await events.wait_for("models_changed", start)
            removed |= set(events.seen[index]["data"]["removed"])
            start = index + 1
        assert events.seen[index]["data"]["models"] == ["tiny-llama-Q8_0"]


def test_a_folder_removed_while_the_models_are_listed_is_passed_over(tmp_path: Path, monkeypatch) -> None:
    """A user deleting a model's folder while the panel lists models or companions: no error (it was a
    500 on GET /bridge/v1/companions while a test removed its folder)."""
    from bridge import library

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{folder}-Q8_0.gguf").write_bytes(b"GGUF")
        (tmp_path / folder / f"mmproj-{folder}-F16.gguf").write_bytes(b"GGUF")
    real_walk = os.walk

    def walk_while_b_goes(root, *args, **kwargs):
        for step in real_walk(root, *args, **kwargs):
            if Path(step[0]) == tmp_path:
                shutil.rmtree(tmp_path / "b")  # listed already, gone before it is read
            yield step

    monkeypatch.setattr(library.os, "walk", walk_while_b_goes)
    assert [m.id for m in library.scan(tmp_path)] == ["a/a-Q8_0"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mmproj-b-F16.gguf").write_bytes(b"GGUF")
    assert [p.id for p in library.projectors(tmp_path)] == ["a/mmproj-a-F16"]
