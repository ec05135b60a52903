"""Download from the recommendations: a progress bar, Cancel, and Load once the file is in."""

from __future__ import annotations

import re

import pytest

from tests.browser.steps import ensure_connected, show_panel, wait_bridge_state, wait_online
from tests.fixtures.sillytavern import TEST_REPO, Stage, tiny_entry
from tests.fixtures.tiny import split_gguf

pytestmark = pytest.mark.browser

CANDIDATE = "#st_bridge_recommendations .st-bridge-candidate"
SPLIT_REPO = "st-bridge-test/tiny-llama-split-GGUF"


def _recommend(stage: Stage) -> None:
    show_panel(stage)
    stage.browser.page.click("#st_bridge_recommend")
    stage.browser.page.wait_for_selector(f"{CANDIDATE} .st-bridge-download", timeout=60000)


def test_a_download_can_be_cancelled(stage: Stage) -> None:
    page = stage.browser
    _recommend(stage)
    page.page.click(f"{CANDIDATE} .st-bridge-download")
    page.page.wait_for_selector(f"{CANDIDATE} .st-bridge-cancel")
    page.page.click(f"{CANDIDATE} .st-bridge-cancel")
    page.page.wait_for_selector(f"{CANDIDATE} .st-bridge-download", timeout=30000)  # offered again
    states = [d["state"] for d in stage.bridge.get_json("/bridge/v1/downloads")["downloads"]]
    assert states[-1] == "cancelled"


def test_a_download_shows_progress_finishes_and_loads(stage: Stage) -> None:
    page = stage.browser
    ensure_connected(stage)
    _recommend(stage)
    quant = page.page.locator(f"{CANDIDATE} .st-bridge-quant").first.inner_text()
    page.page.click(f"{CANDIDATE} .st-bridge-download")

    # While the local Hub sends the file (throttled to about 1 MB/s) the row shows a bar, the bytes and
    # Cancel. huggingface_hub reports progress per 10 MB read, so on this 4 MB file the bar itself only
    # moves at the end; on real multi-GB files it moves every 10 MB.
    progress = page.page.locator(f"{CANDIDATE} .st-bridge-progress-text")
    progress.wait_for(timeout=30000)
    assert " of 3.7 MB" in progress.inner_text()
    assert page.page.locator(f"{CANDIDATE} .st-bridge-cancel").is_visible()
    page.screenshot("downloading")

    page.page.wait_for_selector(f"{CANDIDATE} .st-bridge-load", timeout=60000)
    model = f"{TEST_REPO}/tiny-llama-{quant}"
    assert page.page.locator(f"{CANDIDATE} .st-bridge-load").get_attribute("data-model") == model
    page.page.click(f"{CANDIDATE} .st-bridge-load")
    wait_online(stage, model, timeout_s=60)  # automatic mode follows the new model
    assert stage.bridge.status()["model"] == model
    page.screenshot("downloaded-and-loaded")

    # Back to the model the other tests expect (through the panel's own load call).
    page.js("() => window.stBridge.load('tiny-llama-Q8_0', 4096)")
    wait_online(stage, "tiny-llama-Q8_0", timeout_s=60)


def test_a_split_model_downloads_as_one_and_offers_load(stage: Stage, tmp_path) -> None:
    """Parts `-00001-of-00002.gguf` and `-00002-of-00002.gguf` are one model, whose id has no part number."""
    page = stage.browser
    ensure_connected(stage)
    source = stage.bridge.models_dir / "tiny-llama-Q8_0.gguf"
    parts = split_gguf(source, tmp_path / "tiny-split-Q8_0.gguf", max_tensors=20)
    assert [p.name for p in parts] == [f"tiny-split-Q8_0-0000{n}-of-00002.gguf" for n in (1, 2)]
    for part in parts:
        stage.hub.add_file(SPLIT_REPO, part.name, part)
    model = f"{SPLIT_REPO}/tiny-split-Q8_0"
    try:
        stage.restart_bridge(catalog_extra=[tiny_entry(SPLIT_REPO, "tiny-split", {"Q8_0": parts})])
        wait_bridge_state(stage, "ready", timeout_s=60)
        _recommend(stage)
        title = page.page.locator(".st-bridge-candidate-title b", has_text=re.compile(r"^\d+\. tiny-split$"))
        row = page.page.locator(CANDIDATE, has=title)
        row.locator(".st-bridge-download").click()
        row.locator(".st-bridge-load").wait_for(timeout=60000)
        assert row.locator(".st-bridge-load").get_attribute("data-model") == model
        row.locator(".st-bridge-load").click()
        wait_online(stage, model, timeout_s=60)
        assert stage.bridge.status()["model"] == model
        page.screenshot("split-downloaded-and-loaded")
    finally:
        stage.hub.repos.pop(SPLIT_REPO, None)
        for part in parts:
            (stage.bridge.models_dir / SPLIT_REPO / part.name).unlink(missing_ok=True)
        stage.restart_bridge()  # the stage's own catalog and model again
        wait_bridge_state(stage, "ready", timeout_s=60)
