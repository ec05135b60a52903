"""The panel shows what the bridge reports: hardware, the loaded model and its quants, recommendations."""

from __future__ import annotations

import re
import shutil
from typing import Any

import pytest

from tests.browser.steps import show_panel, wait_bridge_state
from tests.fixtures.sillytavern import Stage

pytestmark = pytest.mark.browser


def without_free_figures(summary: str) -> str:
    return re.sub(r"\([\d.]+ GB free\)", "(free)", summary)


def test_the_panel_shows_the_hardware_and_the_loaded_model(stage: Stage) -> None:
    page = stage.browser
    wait_bridge_state(stage, "ready")
    show_panel(stage)
    status = stage.bridge.status()
    hardware = stage.bridge.get_json("/bridge/v1/hardware")
    page.wait_js("() => document.querySelector('#st_bridge_hardware').textContent.length > 0")

    shown = page.page.locator("#st_bridge_hardware").inner_text()
    # The panel's probe and this one ran at different moments: free memory may differ, nothing else.
    assert without_free_figures(shown) == without_free_figures(hardware["summary"])
    assert page.page.locator("#st_bridge_model_name").inner_text() == status["model"]
    # The memory figure comes with the plan, which may reach the panel a moment after the model's name.
    page.wait_js(r"() => / · [\d.]+ [KMG]B RAM$/.test($('#st_bridge_model_details').text())")
    details = page.page.locator("#st_bridge_model_details").inner_text()
    quant = status["model"].rsplit("-", 1)[1]
    assert details.startswith(f"{quant} · 4k context · {status['n_gpu_layers']} GPU layers")
    assert re.search(r" · [\d.]+ [KMG]B RAM$", details), details  # from the plan's memory per device
    # Planned beside allocated, per device: the CPU-only plan of this machine has one row, RAM.
    page.wait_js("() => document.querySelectorAll('#st_bridge_memory tbody tr').length > 0")
    rows = page.page.locator("#st_bridge_memory tbody tr").all()
    assert [r.get_attribute("data-device") for r in rows] == list(status["plan"]["planned"])
    planned_cell, allocated_cell = rows[-1].locator("td").all_inner_texts()[1:]
    assert re.fullmatch(r"[\d.]+ [KMG]B", planned_cell) and re.fullmatch(r"[\d.]+ [KMG]B", allocated_cell)
    page.wait_js("() => document.querySelectorAll('#st_bridge_quants .st-bridge-chip').length === 4")
    chips = page.page.locator("#st_bridge_quants .st-bridge-chip-quant").all_inner_texts()
    assert chips == ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
    # Each local quant carries the planner's verdict as a badge (the tiny model fits on any machine).
    verdicts = {m["id"]: (m.get("fit") or {}).get("verdict")
                for m in stage.bridge.get_json("/bridge/v1/models")["models"]}
    badges = page.page.locator("#st_bridge_quants .st-bridge-badge").all_inner_texts()
    assert badges == [VERDICT_LABELS[verdicts[f"tiny-llama-{chip}"]] for chip in chips], verdicts
    active = page.page.locator("#st_bridge_quants .st-bridge-chip.active .st-bridge-chip-quant")
    assert active.inner_text() == quant
    page.screenshot("panel")


def test_recommend_lists_ranked_models_with_fit_badges_reasons_and_speed(stage: Stage) -> None:
    page = stage.browser
    show_panel(stage)
    expected = stage.bridge.get_json("/bridge/v1/recommend?limit=8")["candidates"]
    assert expected, "the stage's catalog holds the tiny model, which fits everywhere"
    page.page.click("#st_bridge_recommend")
    page.page.wait_for_selector("#st_bridge_recommendations .st-bridge-candidate", timeout=60000)
    rows = page.page.locator("#st_bridge_recommendations .st-bridge-candidate")
    assert rows.count() == len(expected)
    for index, item in enumerate(expected):
        row = rows.nth(index)
        assert row.locator(".st-bridge-candidate-title b").inner_text() == f"{index + 1}. {item['name']}"
        assert row.locator(".st-bridge-quant").inner_text() == item["quant"]
        assert row.locator(".st-bridge-badge").inner_text() == VERDICT_LABELS[item["verdict"]]
        assert item["reason"] in row.inner_text()
        assert f"~{round(item['expected_tok_s'])} tok/s" in row.inner_text()
    page.screenshot("recommend")


VERDICT_LABELS = {"full_gpu": "Full GPU", "partial_gpu": "Partial GPU", "cpu_only": "CPU only",
                  "wont_fit": "Won't fit"}


def test_the_context_of_a_model_from_outside_the_models_folder_changes_from_the_panel(stage: Stage,
                                                                                      tmp_path) -> None:
    """`serve --model /elsewhere/x.gguf`: no id names that file, yet Apply reloads it with the new context."""
    page = stage.browser
    elsewhere = tmp_path / "elsewhere" / "tiny-elsewhere-Q8_0.gguf"
    elsewhere.parent.mkdir()
    shutil.copyfile(stage.bridge.models_dir / "tiny-llama-Q8_0.gguf", elsewhere)
    not_found: list[str] = []

    def on_response(response: Any) -> None:
        if response.status == 404:
            not_found.append(response.url)

    page.page.on("response", on_response)
    try:
        stage.restart_bridge("--model", str(elsewhere))
        wait_bridge_state(stage, "ready", timeout_s=60)
        page.wait_js("() => $('#st_bridge_model_name').text() === 'tiny-elsewhere-Q8_0'")
        show_panel(stage)
        page.page.select_option("#st_bridge_ctx", "2048")
        page.page.click("#st_bridge_apply_ctx")
        page.wait_js("() => /^Q8_0 · 2k context/.test($('#st_bridge_model_details').text())", 60)
        status = stage.bridge.status()
        assert (status["n_ctx"], status["model_path"]) == (2048, str(elsewhere))
        assert not page.page.locator("#toast-container .toast-error").count()
    finally:
        page.page.remove_listener("response", on_response)
        stage.restart_bridge()  # the stage's own model again
        wait_bridge_state(stage, "ready", timeout_s=60)
    # No catalog repository holds that file: the bridge knows no other quants of it, which is no error.
    assert not_found == []
