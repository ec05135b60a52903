""""Use in SillyTavern" sets SillyTavern's connection to the bridge, and chat replies stream from it."""

from __future__ import annotations

import pytest

from tests.browser.steps import ensure_connected, use_in_sillytavern
from tests.fixtures.sillytavern import BRIDGE_CTX, Stage

pytestmark = pytest.mark.browser


def test_use_in_sillytavern_fills_the_connection_and_goes_online(stage: Stage) -> None:
    page = stage.browser
    status = stage.bridge.status()
    assert page.js("() => SillyTavern.getContext().onlineStatus") == "no_connection"

    use_in_sillytavern(stage)

    fields = page.js("""() => ({
        mainApi: $('#main_api').val(), type: $('#textgen_type').val(),
        url: $('#koboldcpp_api_url_text').val(),
        streaming: $('#streaming_textgenerationwebui').prop('checked'), tokenizer: $('#tokenizer').val(),
        maxContext: SillyTavern.getContext().maxContext,
        shown: $('#textgenerationwebui_api .online_status_text').text(),
    })""")
    assert fields["mainApi"] == "textgenerationwebui"
    assert fields["type"] == "koboldcpp"
    assert fields["url"].rstrip("/") == stage.bridge.url
    assert fields["streaming"] is True
    assert fields["tokenizer"] == "6"  # "API (WebUI / koboldcpp)": token counts come from the bridge
    assert fields["maxContext"] == status["n_ctx"] == BRIDGE_CTX
    assert status["model"] in fields["shown"]
    toast = "Now using tiny-llama Q8_0, 4k context"
    page.page.locator("#toast-container .toast-success", has_text=toast).wait_for()
    page.screenshot("connected")

    # ST saved what the extension set: it survives a reload.
    page.wait_js("() => true")
    stage.browser.page.wait_for_timeout(1500)  # ST saves settings debounced
    saved = stage.st.settings()
    assert saved["textgenerationwebui_settings"]["server_urls"]["koboldcpp"].rstrip("/") == stage.bridge.url
    assert saved["extension_settings"]["st_bridge"]["linked"] is True


def test_a_chat_message_gets_a_reply_streamed_from_the_bridge(stage: Stage) -> None:
    page = stage.browser
    ensure_connected(stage)
    page.js("() => SillyTavern.getContext().selectCharacterById(0)")
    page.wait_js("() => SillyTavern.getContext().characterId !== undefined"
                 " && $('#send_textarea').is(':visible')")
    page.wait_js("() => SillyTavern.getContext().chat.length >= 1")  # the character's greeting
    page.js("""() => {
        const c = SillyTavern.getContext();
        window.__streamed = 0;
        window.__ended = false;
        c.eventSource.on(c.eventTypes.STREAM_TOKEN_RECEIVED, () => { window.__streamed += 1; });
        c.eventSource.on(c.eventTypes.GENERATION_ENDED, () => { window.__ended = true; });
    }""")
    generate = "/api/backends/text-completions/generate"
    with page.page.expect_request(lambda r: r.url.endswith(generate)) as sent:
        page.page.fill("#send_textarea", "Hello there, tell me a story.")
        page.page.click("#send_but")
    body = sent.value.post_data_json
    assert body["stream"] is True
    assert body["api_type"] == "koboldcpp"
    assert body["api_server"].rstrip("/") == stage.bridge.url

    page.wait_js("() => window.__ended", 60)
    reply = page.js("() => { const chat = SillyTavern.getContext().chat; return chat[chat.length - 1]; }")
    assert reply["is_user"] is False
    assert reply["mes"].strip(), "the reply is empty"
    assert page.js("() => window.__streamed") > 1, "the reply arrived in one piece, not streamed"
    page.screenshot("chat")
