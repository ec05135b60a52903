"""The proof that ST, given the presets the bridge derives, writes the model's own prompt.

For every real template in tests/data/templates (manifest.json says where each comes from), the presets are
derived from the template alone; SillyTavern's own prompt code (tests/st_prompt/assemble.mjs, ST 1.19.0 and
1.12.14 as installed from npm) then builds the prompt for a chat of several turns with a system prompt, and
that prompt must equal the template's Jinja render of the same chat with the generation prompt, byte for
byte (the BOS text aside: the bridge adds the BOS token to what ST sends).

Where ST's preset format cannot express a template, NOT_EXACT names the part; there the rest of the chat
must still be exact and the preset does the closest thing, which is checked too.
"""

from __future__ import annotations

from typing import Any

import pytest

from bridge.errors import ChatTemplateError
from tests.fixtures.sillytavern import ST_VERSIONS
from tests.fixtures.st_assembly import (
    CHAT,
    GREETING_CHAT,
    MANIFEST,
    STORY,
    SYSTEM_MESSAGE,
    assemble,
    derived,
    jinja_prompt,
)

ENTRIES = MANIFEST["templates"]
IDS = [e["model"] for e in ENTRIES]

# What ST's instruct/context presets cannot say, per model, and why. Anything not named here is exact.
NOT_EXACT = {
    # The template writes the system prompt inside the *last* user message ([INST]system\n\nuser[/INST]);
    # ST's story string is a block at the top. Closest: the story string as its own [INST] turn.
    "Mistral-Nemo-Instruct-2407": "system_prompt",
    # These refuse a system message (raise_exception): the story string goes as a user turn of its own.
    "Mistral-7B-Instruct-v0.2": "system_prompt",
    "gemma-2-2b-it": "system_prompt",
    "gemma-7b-it": "system_prompt",
    # This one leaves system messages out of the prompt altogether; same closest choice.
    "Phi-3-mini-4k-instruct": "system_prompt",
}


@pytest.fixture(scope="module")
def st_prompts() -> dict[tuple[str, str], dict[str, Any]]:
    """ST's prompt for every template, in each release, for the chat that opens with the user's message
    and for the one that opens with the character's greeting: {(version, model or model|greeting): ...}."""
    cases = []
    for e in ENTRIES:
        fmt = derived(e).to_dict()
        cases += [{"id": e["model"], "format": fmt, "story": STORY, "chat": CHAT},
                  {"id": f"{e['model']}|greeting", "format": fmt, "story": STORY, "chat": GREETING_CHAT}]
    answers: dict[tuple[str, str], dict[str, Any]] = {}
    for version in ST_VERSIONS:
        for model, answer in assemble(version, cases).items():
            answers[version, model] = answer
    return answers


# Templates that refuse a chat opening with the character's greeting (roles must alternate user/assistant,
# starting with the user): there is no render of their own to compare with.
REFUSE_GREETING = {"Mistral-Nemo-Instruct-2407", "Mistral-Small-3.2-24B-Instruct-2506",
                   "Mistral-7B-Instruct-v0.2", "gemma-2-2b-it", "gemma-7b-it", "c4ai-command-r-plus"}


def test_at_least_fifteen_families() -> None:
    assert len({e["family"] for e in ENTRIES}) >= 15


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@pytest.mark.parametrize("version", ST_VERSIONS)
def test_sillytavern_writes_the_models_own_prompt(version: str, entry: dict[str, Any],
                                                  st_prompts: dict[tuple[str, str], dict[str, Any]]) -> None:
    answer = st_prompts[version, entry["model"]]
    assert "error" not in answer, answer.get("error")
    fmt = derived(entry)
    expected_parts = [NOT_EXACT[entry["model"]]] if entry["model"] in NOT_EXACT else []
    assert [i.part for i in fmt.inexact] == expected_parts
    assert answer["prompt"] == expected_prompt(entry, CHAT)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@pytest.mark.parametrize("version", ST_VERSIONS)
def test_a_chat_opened_by_the_characters_greeting_too(
    version: str, entry: dict[str, Any], st_prompts: dict[tuple[str, str], dict[str, Any]]
) -> None:
    answer = st_prompts[version, f"{entry['model']}|greeting"]
    assert "error" not in answer, answer.get("error")
    if entry["model"] in REFUSE_GREETING:
        with pytest.raises(ChatTemplateError):
            jinja_prompt(entry, system=False, chat=GREETING_CHAT)
        return
    assert answer["prompt"] == expected_prompt(entry, GREETING_CHAT)


def expected_prompt(entry: dict[str, Any], chat: list[dict[str, str]]) -> str:
    """The model's own prompt for `chat` after the proof's system prompt; for a template named in NOT_EXACT
    the closest one: the system prompt as a user turn of its own, then the chat exactly as the template
    writes it without one."""
    if entry["model"] not in NOT_EXACT:
        return jinja_prompt(entry, chat=chat)
    instruct = derived(entry).instruct
    assert instruct.story_string_prefix == instruct.input_sequence
    story_turn = instruct.story_string_prefix + SYSTEM_MESSAGE + instruct.story_string_suffix
    return story_turn + jinja_prompt(entry, system=False, chat=chat)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_the_reply_stops_at_the_models_end_of_turn(
    entry: dict[str, Any], st_prompts: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """ST's stop strings hold the template's end-of-turn text, or (for templates whose assistant turn
    ends with nothing of its own) the opening of the next user turn."""
    fmt = derived(entry)
    stops = st_prompts["1.19.0", entry["model"]]["stops"]
    wanted = fmt.instruct.stop_sequence or fmt.instruct.input_sequence.strip().split("\n")[0]
    assert wanted and wanted in stops, (wanted, stops)


def test_the_bos_text_is_left_to_the_bridge() -> None:
    """A template that begins with BOS text gets presets without it (ST would send it as text and the
    bridge add the token again), and says so."""
    llama = next(e for e in ENTRIES if e["model"] == "Llama-3.1-8B-Instruct")
    fmt = derived(llama)
    assert fmt.template_writes_bos and fmt.bos_token == "<|begin_of_text|>"
    assert "<|begin_of_text|>" not in fmt.instruct.story_string_prefix
    qwen = derived(next(e for e in ENTRIES if e["model"] == "Qwen2.5-7B-Instruct"))
    assert not qwen.template_writes_bos
