"""SillyTavern follows the bridge by itself: one reconnect per model swap, and recovery after a restart."""

from __future__ import annotations

import pytest

from tests.browser.steps import StatusChecks, ensure_connected, show_panel, wait_bridge_state, wait_online
from tests.fixtures.sillytavern import BRIDGE_CTX, Stage

pytestmark = pytest.mark.browser

SETTLE_MS = 2000  # time for any extra reconnect to show up before counting


def test_a_quant_swap_from_the_panel_reconnects_sillytavern_exactly_once(stage: Stage) -> None:
    page = stage.browser
    ensure_connected(stage)
    show_panel(stage)
    current = stage.bridge.status()["model"]
    target = "tiny-llama-Q4_K_M" if current != "tiny-llama-Q4_K_M" else "tiny-llama-Q5_K_M"
    checks = StatusChecks(stage)
    reconnects_before = page.js("() => window.stBridge.reconnects")
    try:
        page.page.click(f"#st_bridge_quants .st-bridge-chip[data-id='{target}']")
        wait_online(stage, target, timeout_s=60)
        page.page.wait_for_timeout(SETTLE_MS)
        assert checks.count == 1, f"SillyTavern checked its connection {checks.count} times"
    finally:
        checks.close()
    assert page.js("() => window.stBridge.reconnects") == reconnects_before + 1
    assert page.js("() => SillyTavern.getContext().maxContext") == BRIDGE_CTX
    assert target in page.js("() => $('#textgenerationwebui_api .online_status_text').text()")
    quant = target.rsplit("-", 1)[1]
    toast = f"Now using tiny-llama {quant}, 4k context"
    page.page.locator("#toast-container .toast-success", has_text=toast).wait_for()
    assert page.page.locator("#st_bridge_quants .st-bridge-chip.active").inner_text().startswith(quant)
    page.screenshot("quant-swapped")


def test_the_panel_recovers_when_the_bridge_restarts_without_a_page_reload(stage: Stage) -> None:
    page = stage.browser
    ensure_connected(stage)
    show_panel(stage)
    page.js("() => { window.__samePage = true; }")

    stage.bridge.stop()
    wait_bridge_state(stage, "offline")
    page.screenshot("bridge-down")
    stage.restart_bridge()  # comes back with tiny-llama-Q8_0, its --model
    wait_bridge_state(stage, "ready", timeout_s=60)

    assert page.js("() => window.__samePage") is True, "the page was reloaded"
    assert page.page.locator("#st_bridge_model_name").inner_text() == "tiny-llama-Q8_0"
    # A different model than before the restart: SillyTavern is pointed at it by itself.
    wait_online(stage, "tiny-llama-Q8_0", timeout_s=60)
    page.screenshot("bridge-restarted")
