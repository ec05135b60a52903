"""The model's own prompt format, set in SillyTavern by the extension, and swipes that cost one prompt.

After "Use in SillyTavern" with the ChatML tiny model, then a swap to the same weights under Llama 3's chat
template, ST's selected instruct preset follows each time, and the prompt ST sends for a chat message is
the model's own render of that chat (its Jinja template, with the system prompt ST wrote). Then three
swipes are generated in one request and all shown (ST 1.19; 1.12 has no multi-swipe for llama.cpp).
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bridge.gguf import model_info, read_file
from bridge.templates.jinja_render import render
from tests.browser.steps import ensure_connected, open_chat, press_use_in_sillytavern, show_panel, wait_online
from tests.fixtures.sillytavern import Stage
from tests.fixtures.template_models import tiny_llama3

pytestmark = pytest.mark.browser

GENERATE = "/api/backends/text-completions/generate"
CHATML_MODEL, LLAMA3_MODEL = "tiny-llama-Q8_0", "tiny-llama3-Q8_0"


def selected_instruct(stage: Stage) -> dict[str, Any]:
    return stage.browser.js("() => { const p = SillyTavern.getContext().powerUserSettings;"
                            " return {preset: p.instruct.preset, enabled: p.instruct.enabled,"
                            " context: p.context.preset}; }")


def wait_preset(stage: Stage, name: str) -> None:
    stage.browser.wait_js("(n) => { const p = SillyTavern.getContext().powerUserSettings; return"
                          " p.instruct.enabled && p.instruct.preset === n && p.context.preset === n; }",
                          30, arg=name)


class QuantLookups:
    """The panel asks for the quants of every model it loads; for a model outside the catalog (the Llama 3
    variant) the bridge answers 404, which Chromium logs as a console error. Those, and only those, are
    taken back out of the page's console errors."""

    def __init__(self, stage: Stage) -> None:
        self.stage, self.count = stage, 0
        stage.browser.page.on("response", self._seen)

    def _seen(self, response: Any) -> None:
        if response.status == 404 and response.url.endswith(f"/models/{LLAMA3_MODEL}/quants"):
            self.count += 1

    def forget_their_errors(self) -> None:
        self.stage.browser.page.remove_listener("response", self._seen)
        errors = self.stage.browser.console_errors
        for _ in range(self.count):
            found = next((e for e in reversed(errors) if "404 (Not Found)" in e), None)
            if found is not None:
                errors.remove(found)


def load_from_panel(stage: Stage, model: str) -> None:
    stage.browser.js("(m) => window.stBridge.load(m)", model)
    wait_online(stage, model, timeout_s=90)
    stage.browser.wait_js("() => !window.stBridge.connecting")


REPLY_TOKENS = 32  # short replies: the tiny model writes noise, and a loaded test machine writes it slowly


def set_response_length(stage: Stage, tokens: int) -> int:
    """Sets ST's response length (its own setter, as a preset does); returns the previous value."""
    return stage.browser.js("""async (n) => { const script = await import('/script.js');
        const before = script.amount_gen; script.setGenerationParamsFromPreset({ genamt: n });
        return before; }""", tokens)


def send(stage: Stage, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sends a chat message; (the request body ST sent for the reply, the chat that prompt was built from)."""
    page = stage.browser
    page.js("""() => { const c = SillyTavern.getContext(); window.__ended = false;
        c.eventSource.once(c.eventTypes.GENERATION_ENDED, () => { window.__ended = true; }); }""")
    with page.page.expect_request(lambda r: r.url.endswith(GENERATE)) as sent:
        page.page.fill("#send_textarea", text)
        page.page.click("#send_but")
    page.wait_js("() => window.__ended", 90)
    # ST may still be writing the reply into the chat and saving it when it announces the end.
    page.wait_js("""async () => { const st = await import('/script.js');
        return !st.is_send_press && !st.isChatSaving; }""", 60)
    chat = page.js("() => SillyTavern.getContext().chat.map(m => ({is_user: m.is_user, mes: m.mes}))")
    return sent.value.post_data_json, chat[:-1]  # the last message is the reply


def trimmed_turns(prompt: str) -> str:
    """A Llama 3 prompt with each turn's text stripped, as the template's `| trim` writes it."""
    return re.sub(r"(<\|end_header_id\|>\n\n)(.*?)(<\|eot_id\|>)", lambda m: m[1] + m[2].strip() + m[3],
                  prompt, flags=re.S)


def models_own_prompt(model_file: Path, fmt: dict[str, Any], prompt: str, chat: list[dict[str, Any]]) -> str:
    """The model's Jinja render of `chat` after the system prompt ST wrote (read between the format's
    system opening and closing), with the generation prompt, without the BOS text the bridge adds."""
    info = model_info(read_file(model_file))
    opening, closing = fmt["instruct"]["story_string_prefix"], fmt["instruct"]["story_string_suffix"]
    assert prompt.startswith(opening), prompt[:200]
    system = prompt[len(opening):prompt.index(closing, len(opening))]
    messages = [{"role": "system", "content": system}] + [
        {"role": "user" if m["is_user"] else "assistant", "content": m["mes"].replace("\r", "")} for m in chat
    ]
    bos = info.bos_token or ""
    text = render(info.chat_template or "", messages, add_generation_prompt=True, bos_token=bos,
                  eos_token=info.eos_token or "")
    return text[len(bos):] if bos and text.startswith(bos) else text


def test_the_prompt_format_follows_the_model_and_st_sends_its_own_prompt(stage: Stage,
                                                                           tiny_model: Path) -> None:
    page = stage.browser
    models = stage.bridge.models_dir
    shutil.copyfile(tiny_llama3(tiny_model), models / f"{LLAMA3_MODEL}.gguf")
    lookups = QuantLookups(stage)
    length = set_response_length(stage, REPLY_TOKENS)
    try:
        ensure_connected(stage)
        if stage.bridge.status()["model"] != CHATML_MODEL:
            load_from_panel(stage, CHATML_MODEL)
        press_use_in_sillytavern(stage)
        wait_preset(stage, "tiny-llama (st-bridge)")
        show_panel(stage)
        page.page.locator("#st_bridge_format_state", has_text="SillyTavern writes this format").wait_for()
        chatml = stage.bridge.get_json(f"/bridge/v1/models/{CHATML_MODEL}/prompt-format")

        open_chat(stage)
        body, chat = send(stage, "Hello there, who are you?")
        own = models_own_prompt(models / f"{CHATML_MODEL}.gguf", chatml, body["prompt"], chat)
        assert body["prompt"] == own
        assert body["prompt"].endswith("<|im_start|>assistant\n")
        page.screenshot("prompt-format-chatml")

        load_from_panel(stage, LLAMA3_MODEL)  # automatic mode: ST follows, presets included
        wait_preset(stage, "tiny-llama3 (st-bridge)")
        llama3 = stage.bridge.get_json(f"/bridge/v1/models/{LLAMA3_MODEL}/prompt-format")
        body, chat = send(stage, "Tell me more about the forest.")
        own = models_own_prompt(models / f"{LLAMA3_MODEL}.gguf", llama3, body["prompt"], chat)
        # Llama 3's template trims every message (`| trim`); ST writes a message as it is. They differ only
        # where a message starts or ends with white space (the tiny model's replies now and then do).
        assert trimmed_turns(body["prompt"]) == own
        assert body["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert "<|im_start|>" not in body["prompt"]

        # Another template picked in ST by hand: the panel says so and switches back on request.
        page.js("() => $('#instruct_presets').val('Alpaca').trigger('change')")
        show_panel(stage)
        page.page.locator("#st_bridge_format_state", has_text="differ").wait_for()
        page.screenshot("prompt-format-differs")
        page.page.click("#st_bridge_format_apply")
        wait_preset(stage, "tiny-llama3 (st-bridge)")
        page.page.locator("#st_bridge_format_state", has_text="SillyTavern writes this format").wait_for()

        # Automatic off: a swap leaves ST's presets as they are (the user's own choice stands).
        page.js("() => $('#st_bridge_auto').prop('checked', false).trigger('change')")
        request = urllib.request.Request(stage.bridge.url + "/bridge/v1/load", method="POST",
                                         data=json.dumps({"model": CHATML_MODEL}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=120).close()
        page.wait_js("(m) => document.querySelector('#st_bridge_model_name')?.textContent === m", 60,
                     arg=CHATML_MODEL)
        page.page.wait_for_timeout(2000)  # the panel has handled the swap's events by now
        assert selected_instruct(stage)["preset"] == "tiny-llama3 (st-bridge)"
    finally:
        page.js("() => $('#st_bridge_auto').prop('checked', true).trigger('change')")
        if stage.bridge.status()["model"] != CHATML_MODEL:
            load_from_panel(stage, CHATML_MODEL)
        (models / f"{LLAMA3_MODEL}.gguf").unlink(missing_ok=True)
        lookups.forget_their_errors()
        set_response_length(stage, length)


def test_three_swipes_from_one_request_are_all_shown(stage: Stage) -> None:
    if stage.browser.version.startswith("1.12"):
        pytest.skip("SillyTavern 1.12 sends no `n` to llama.cpp (multi-swipe came in 1.13, PR #4869)")
    page = stage.browser
    ensure_connected(stage)
    show_panel(stage)
    page.page.select_option("#st_bridge_api_type", "llamacpp")
    length = set_response_length(stage, REPLY_TOKENS)
    try:
        press_use_in_sillytavern(stage)
        page.wait_js("() => SillyTavern.getContext().textCompletionSettings.type === 'llamacpp'")
        page.js("() => $('#n_textgenerationwebui').val(3).trigger('input')")
        open_chat(stage)
        body, _chat = send(stage, "Tell me a story.")
        assert body["n"] == 3 and body["stream"] is True
        last = page.js("() => { const c = SillyTavern.getContext().chat; return c[c.length - 1]; }")
        assert not last["is_user"] and len(last["swipes"]) == 3, last.get("swipes")
        assert all(s.strip() for s in last["swipes"]), last["swipes"]
        assert len(set(last["swipes"])) == 3
        # ST writes the counter as "1/3" with zero-width spaces (U+200B) around the slash.
        page.wait_js("() => $('#chat .last_mes .swipes-counter').first().text()"
                     ".replace(/\\u200b/g, '') === '1/3'")
        page.screenshot("three-swipes")
    finally:
        page.js("() => $('#n_textgenerationwebui').val(1).trigger('input')")
        set_response_length(stage, length)
        show_panel(stage)
        page.page.select_option("#st_bridge_api_type", "koboldcpp")
        press_use_in_sillytavern(stage)
