"""The slash commands answer with text that ST's pipes can carry."""

from __future__ import annotations

import pytest

from tests.fixtures.sillytavern import Stage

pytestmark = pytest.mark.browser


def _run(stage: Stage, command: str) -> str:
    return stage.browser.page.evaluate(
        "async (c) => (await SillyTavern.getContext().executeSlashCommandsWithOptions(c)).pipe", command)


def test_bridge_status_returns_the_loaded_model(stage: Stage) -> None:
    status = stage.bridge.status()
    text = _run(stage, "/bridge-status")
    assert text.startswith(f"{status['model']} (")
    assert "4k context" in text
    assert _run(stage, "/bridge-status | /echo") == text  # it flows through a pipe


def test_bridge_quant_lists_and_switches_quants(stage: Stage) -> None:
    assert "Q4_K_M" in _run(stage, "/bridge-quant")
    text = _run(stage, "/bridge-quant Q5_K_M")
    assert text.startswith("tiny-llama-Q5_K_M (")
    assert stage.bridge.status()["model"] == "tiny-llama-Q5_K_M"
    assert _run(stage, "/bridge-load tiny-llama-Q8_0").startswith("tiny-llama-Q8_0 (")


def test_bridge_recommend_returns_one_line_per_model(stage: Stage) -> None:
    expected = stage.bridge.get_json("/bridge/v1/recommend?limit=5")["candidates"]
    lines = _run(stage, "/bridge-recommend").splitlines()
    assert len(lines) == len(expected)
    assert lines[0].startswith(f"1. {expected[0]['name']} {expected[0]['quant']} — ")
