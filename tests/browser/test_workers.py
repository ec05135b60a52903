"""The panel lists the bridge's workers (other machines lending a GPU or CPU), adds one by its address, and
after a load shows the split: planned beside allocated memory for the worker's device and for RAM."""

from __future__ import annotations

import pytest

from tests.browser.steps import bridge_call, open_remote_settings, type_into_panel, wait_bridge_state
from tests.fixtures.rpc import lent_for_split, start_worker
from tests.fixtures.sillytavern import BRIDGE_CTX, Stage

pytestmark = pytest.mark.browser


def wait_worker_state(stage: Stage, row: str, state: str) -> None:
    stage.browser.wait_js("([sel, s]) => document.querySelector(sel)?.textContent === s", 30,
                          arg=[f"{row} .st-bridge-worker-state", state])


def test_the_panel_adds_a_worker_and_shows_the_split_after_a_load(stage: Stage) -> None:
    model_path = stage.bridge.models_dir / "tiny-llama-Q8_0.gguf"
    worker = start_worker("--memory", str(lent_for_split(model_path, BRIDGE_CTX, workers=1)))
    page = stage.browser
    try:
        wait_bridge_state(stage, "ready")
        open_remote_settings(stage)
        type_into_panel(stage, "worker_address", worker.address)
        page.page.click("#st_bridge_worker_add")
        row = f'#st_bridge_workers [data-address="{worker.address}"]'
        wait_worker_state(stage, row, "ready")
        assert "CPU" in page.page.locator(f"{row} .st-bridge-worker-devices").inner_text()

        # planned again, with the worker (an f16 cache, as the lent memory was sized for)
        bridge_call(stage, "POST", "/bridge/v1/load", {"gpu_layers": "auto", "kv_type": "f16"})
        plan = stage.bridge.status()["plan"]
        assert plan["placement"]["rpc_servers"] == [worker.address]
        assert 0 < sum(plan["placement"]["layers"]) <= plan["n_layer"]  # some layers stay on the CPU
        wait_worker_state(stage, row, "in use")
        page.page.wait_for_selector('#st_bridge_memory tr[data-device="RPC0"]')
        cells = page.page.locator('#st_bridge_memory tr[data-device="RPC0"] td').all_inner_texts()
        assert cells[0] == f"RPC0 · {plan['devices'][0]['label']}" and worker.address in cells[0]
        assert cells[2] != "—"  # llama.cpp's allocation on the worker is shown beside the plan
        page.screenshot("panel-worker")
    finally:
        try:
            bridge_call(stage, "DELETE", f"/bridge/v1/workers/{worker.address}")
            bridge_call(stage, "POST", "/bridge/v1/load", {"gpu_layers": "auto"})  # this machine alone again
        finally:
            worker.stop()
