"""Download from the recommendations: a progress bar, Cancel, and Load once the file is in."""

from __future__ import annotations

import pytest

from tests.browser.steps import ensure_connected, show_panel, wait_online
from tests.fixtures.sillytavern import TEST_REPO, Stage

pytestmark = pytest.mark.browser

CANDIDATE = "#st_bridge_recommendations .st-bridge-candidate"


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
