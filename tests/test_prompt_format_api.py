"""`GET /bridge/v1/models/{id}/prompt-format` on a real bridge: any local model, loaded or not; a model
without a chat template gets its family's format as a guess (Kunoichi: Alpaca, from its model card)."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest

from bridge.templates.families import guess_family
from tests.fixtures.template_models import retemplated, tiny_llama3


@pytest.fixture
def models(tmp_path: Path, tiny_model: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(tiny_model, folder / "tiny-llama-Q8_0.gguf")
    shutil.copyfile(tiny_llama3(tiny_model), folder / "tiny-llama3-Q8_0.gguf")
    # Kunoichi's GGUFs carry no chat template; the bundled catalog knows its files and its card's format.
    no_template = retemplated(tiny_model, None, "Kunoichi-DPO-v2-7B")
    shutil.copyfile(no_template, folder / "kunoichi-dpo-v2-7b.Q4_K_M.gguf")
    return folder


async def _format(http: aiohttp.ClientSession, model: str) -> tuple[int, dict]:
    async with http.get(f"/bridge/v1/models/{model}/prompt-format") as reply:
        return reply.status, await reply.json()


async def test_prompt_formats_of_loaded_and_unloaded_models(start_bridge, models: Path) -> None:
    server = start_bridge("--model", "tiny-llama-Q8_0", models=models)
    async with aiohttp.ClientSession(server.url) as http:
        status, chatml = await _format(http, "tiny-llama-Q8_0")
        assert status == 200, chatml
        status, llama3 = await _format(http, "tiny-llama3-Q8_0")  # not loaded: read from its header
        assert status == 200, llama3
        status, kunoichi = await _format(http, "kunoichi-dpo-v2-7b.Q4_K_M")
        assert status == 200, kunoichi
        assert (await _format(http, "no-such-model"))[0] == 404
    assert chatml["source"] == "template" and chatml["family"] == "chatml" and chatml["exact"]
    assert chatml["instruct"]["input_sequence"] == "<|im_start|>user\n"
    assert chatml["instruct"]["story_string_prefix"] == "<|im_start|>system\n"
    assert chatml["name"] == "tiny-llama (st-bridge)" == chatml["context"]["name"]
    assert llama3["family"] == "llama3" and llama3["exact"]
    assert llama3["instruct"]["output_sequence"] == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert llama3["template_writes_bos"] and llama3["bos_token"] == "<s>"  # the tiny vocabulary's BOS
    assert kunoichi["source"] == "guess" and kunoichi["family"] == "alpaca"
    assert "model card" in kunoichi["guess_reason"] and "no chat template" in kunoichi["guess_reason"]
    assert kunoichi["instruct"]["input_sequence"] == "### Instruction:\n"
    assert "guessed Alpaca" in kunoichi["name"]


def test_guesses_without_a_model_card() -> None:
    assert guess_family(card_format=None, names=["L3-8B-Stheno-v3.2-Q4_K_M"], tokens=[]).family == "llama3"
    assert guess_family(card_format=None, names=["mystery-7b"], tokens=["<|im_start|>"]).family == "chatml"
    fallback = guess_family(card_format=None, names=["mystery-7b"], tokens=[])
    assert fallback.family == "alpaca" and "nothing names" in fallback.reason
    assert guess_family(card_format="Metharme (a.k.a. Pygmalion in ST) for RP", names=[],
                        tokens=[]).family == "metharme"
