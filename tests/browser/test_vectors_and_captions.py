"""The companions in real SillyTavern: the panel picks an embedding model and a vision projector, its one
click points Vector Storage and Caption at the bridge, ST's Vector Storage (sources KoboldCpp and
llama.cpp) vectorises a chat through the bridge and retrieves a past message by similarity, and ST's
Caption extension captions an attached image with the chat model's projector."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.browser.steps import (
    bridge_call,
    ensure_connected,
    open_chat,
    saved_settings,
    show_panel,
    wait_bridge_state,
    wait_online,
)
from tests.fixtures import companion_models
from tests.fixtures.hub import _ServerThread
from tests.fixtures.sillytavern import Stage
from tests.test_captions import png

pytestmark = pytest.mark.browser

EMBEDDING_FILE = "bge-tiny-en-F32.gguf"
VISION_FILE = "vision-llama-Q8_0.gguf"
PROJECTOR = "mmproj-vision-llama-F32.gguf"
CHAT_MODEL = "tiny-llama-Q8_0"
GENERATE = "/api/backends/text-completions/generate"

# A chat long enough for Vector Storage to look back (it keeps the last 5 messages where they are). The
# tiny embedding model has random weights, so "similar" is made certain: the new message repeats one from
# the middle of the chat word for word, and only a bridge that gives the same text the same vector
# (and other texts other vectors) lets ST find that one among the others.
PAST = [
    "we went to the river in the rain",
    "the knight said hello to the queen",
    "a quick brown fox jumps over the lazy dog",
    "the dragon sat on the castle in the snow",
    "she said the tavern ale was cold",
    "you went with the king to the forest",
    "the sun and the moon over the mountain",
    "my sword is in the water",
    "they said the bread was on the mat",
    "hello world, said the cat",
    "the star was over the river at night",
    "his dog and her cat sat in the sun",
]
RECALLED = PAST[3]


@dataclass
class Companions:
    """The ids of the companion files a test put in the stage's models folder."""

    embedding: str
    vision_model: str


@pytest.fixture
def companions(stage: Stage, request: pytest.FixtureRequest) -> Iterator[Companions]:
    """The tiny embedding model, and a vision model with its projector in a folder of its own (as downloads
    lay them out), in folders named for the test: files of the same name removed and put back in one
    moment would be no change to the models folder's watch, and the panel would not hear of them. Removed
    afterwards, with the chat model as it was."""
    models = stage.bridge.models_dir
    folder = models / re.sub(r"\W+", "-", request.node.name).strip("-")
    (folder / "embed").mkdir(parents=True)
    shutil.copyfile(companion_models.tiny_bert(), folder / "embed" / EMBEDDING_FILE)
    (folder / "vision").mkdir()
    shutil.copyfile(models / f"{CHAT_MODEL}.gguf", folder / "vision" / VISION_FILE)
    shutil.copyfile(companion_models.tiny_mmproj(), folder / "vision" / PROJECTOR)
    prefix = folder.name
    try:
        yield Companions(f"{prefix}/embed/{EMBEDDING_FILE[:-5]}", f"{prefix}/vision/{VISION_FILE[:-5]}")
    finally:
        if stage.bridge.status()["companions"]["embedding"]["state"] != "empty":
            bridge_call(stage, "DELETE", "/bridge/v1/companions/embedding")
        if stage.bridge.status()["model"] != CHAT_MODEL:
            bridge_call(stage, "POST", "/bridge/v1/load", {"model": CHAT_MODEL})
            wait_online(stage, CHAT_MODEL, timeout_s=90)  # the panel reconnects SillyTavern (automatic)
            stage.browser.wait_js("() => !window.stBridge.connecting")
        shutil.rmtree(folder)


def wait_companion_state(stage: Stage, which: str, state: str, timeout_s: float = 60) -> str:
    stage.browser.wait_js("([id, s]) => document.querySelector(id)?.dataset.state === s", timeout_s,
                          arg=[f"#st_bridge_{which}_state", state])
    return stage.browser.page.locator(f"#st_bridge_{which}_state").inner_text()


def pick_embedding_in_panel(stage: Stage, model: str) -> str:
    """Picks the embedding model from the panel's list (it appears there once the file is in the folder)."""
    page = stage.browser
    wait_bridge_state(stage, "ready")
    show_panel(stage)
    page.wait_js("(id) => [...document.querySelectorAll('#st_bridge_embedding_pick option')]"
                 ".some(o => o.value === id)", 30, arg=model)
    page.page.select_option("#st_bridge_embedding_pick", model)
    return wait_companion_state(stage, "embedding", "ready")


SETUP_TOASTS = ("() => [...document.querySelectorAll('#toast-container .toast-success')]"
                ".filter(t => t.textContent.includes('now use the bridge')).length")


def press_companions_setup(stage: Stage) -> None:
    """The panel's one click for Vector Storage and Caption; done when its toast says what it set."""
    page = stage.browser
    before = page.js(SETUP_TOASTS)
    page.page.click("#st_bridge_companions_setup")
    page.wait_js(f"(n) => ({SETUP_TOASTS})() > n", 30, arg=before)


# --- Vector Storage ----------------------------------------------------------------------------------


def vector_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return settings["extension_settings"].get("vectors", {})


def open_chat_with_past(stage: Stage) -> None:
    """The first character's chat, started afresh, with PAST as its messages (user and character in turn)."""
    page = stage.browser
    open_chat(stage)
    page.js("""async (texts) => {
        const c = SillyTavern.getContext();
        c.chat.splice(1);
        for (const [i, mes] of texts.entries()) {
            const message = { name: i % 2 ? c.name2 : c.name1, is_user: i % 2 === 0, is_system: false,
                              send_date: new Date().toISOString(), mes, extra: {} };
            c.chat.push(message);
        }
        await c.saveChat();
        await c.reloadCurrentChat();
    }""", PAST)
    page.wait_js("(n) => SillyTavern.getContext().chat.length === n", 30, arg=len(PAST) + 1)


def clear_chat(stage: Stage) -> None:
    """Back to the greeting alone, once ST has finished what it was doing with the chat (a save racing this
    one is refused by ST's integrity check, and a reply saved after it would come back)."""
    page = stage.browser
    page.wait_js("""async () => { const st = await import('/script.js');
        return !st.is_send_press && !st.isChatSaving; }""", 60)
    page.js("""async () => { const c = SillyTavern.getContext(); c.chat.splice(1);
        await c.saveChat(); await c.reloadCurrentChat(); }""")


def use_chat_vectors(stage: Stage, on: bool) -> None:
    """Vector Storage's "Enabled for chat messages", querying with the last message alone (its controls)."""
    stage.browser.js("""(on) => {
        $('#vectors_enabled_chats').prop('checked', on).trigger('input');
        $('#vectors_query').val(on ? 1 : 2).trigger('input');
    }""", on)


def vectorize_all(stage: Stage) -> None:
    """Vector Storage's "Vectorize All": its progress line shows while it runs (display set, even in a closed
    drawer) and is hidden again when every message has its vector."""
    page = stage.browser
    started = page.js("""() => { $('#vectors_vectorize_all').trigger('click');
        return $('#vectorize_progress').css('display') !== 'none'; }""")
    assert started, "Vectorize All did not start"
    page.wait_js("() => $('#vectorize_progress').css('display') === 'none'", 120)


class VectorTraffic:
    """Vector Storage's requests to ST's server while a test runs: ST vectorises new messages by itself a
    moment after they arrive, and one still running when the test drops the embedding model would fail."""

    QUIET_S = 2.0  # longer than ST's debounce before it vectorises new messages

    def __init__(self, stage: Stage) -> None:
        self._page: Any = stage.browser.page
        self.running = 0
        self.last = time.monotonic()
        self._page.on("request", self._started)
        self._page.on("requestfinished", self._ended)
        self._page.on("requestfailed", self._ended)

    @staticmethod
    def _ours(request: Any) -> bool:
        return "/api/vector/" in request.url or request.url.endswith("/embed")

    def _started(self, request: Any) -> None:
        if self._ours(request):
            self.running += 1
            self.last = time.monotonic()

    def _ended(self, request: Any) -> None:
        if self._ours(request):
            self.running -= 1
            self.last = time.monotonic()

    def wait_quiet(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.running or time.monotonic() - self.last < self.QUIET_S:
            assert time.monotonic() < deadline, "Vector Storage kept sending requests"
            self._page.wait_for_timeout(200)  # Playwright delivers the page's events only while called

    def close(self) -> None:
        for event, handler in (("request", self._started), ("requestfinished", self._ended),
                               ("requestfailed", self._ended)):
            self._page.remove_listener(event, handler)


def recalled_block(prompt: str) -> str:
    """The "Past events" block Vector Storage put in the prompt (its default template), up to the blank line
    or the ChatML turn's end or start (the tiny model's format) that follows it."""
    assert "Past events:\n" in prompt, prompt[-2000:]
    block = prompt.split("Past events:\n", 1)[1]
    return re.split(r"\n\n|<\|im_end\|>|\n<\|im_start\|>", block, maxsplit=1)[0].strip()


def send_and_read_prompt(stage: Stage, text: str) -> str:
    page = stage.browser
    page.js("""() => { const c = SillyTavern.getContext(); window.__ended = false;
        c.eventSource.once(c.eventTypes.GENERATION_ENDED, () => { window.__ended = true; }); }""")
    with page.page.expect_request(lambda r: r.url.endswith(GENERATE), timeout=120_000) as sent:
        page.page.fill("#send_textarea", text)
        page.page.click("#send_but")
    page.wait_js("() => window.__ended", 120)
    return sent.value.post_data_json["prompt"]


# ST 1.12 reads a KoboldCpp-sourced index without the model's name and never finds what it stored (fixed in
# 1.13, whatever the backend): the panel's one click picks llama.cpp there.
ONE_CLICK_SOURCE = {"1.19.0": "koboldcpp", "1.12.14": "llamacpp"}


@pytest.mark.parametrize("how", ["one click in the panel", "llama.cpp by hand"])
def test_vector_storage_retrieves_a_past_message_through_the_bridge(stage: Stage, companions: Companions,
                                                                    how: str) -> None:
    page = stage.browser
    ensure_connected(stage)
    described = pick_embedding_in_panel(stage, companions.embedding)
    assert described.startswith(f"{companions.embedding}: 64 dimensions"), described
    if how == "one click in the panel":
        source = ONE_CLICK_SOURCE[stage.st.version]
        press_companions_setup(stage)
    else:  # a user who picks llama.cpp in Vector Storage and types the bridge's URL as its endpoint
        source = "llamacpp"
        page.js("""(url) => {
            $('#vectors_source').val('llamacpp').trigger('change');
            $('#vector_altEndpointUrl_enabled').prop('checked', true).trigger('input');
            $('#vector_altEndpoint_address').val(url).trigger('change');
        }""", stage.bridge.url)
    saved = saved_settings(stage, lambda s: vector_settings(s).get("source") == source)
    vectors = vector_settings(saved)
    assert vectors["source"] == source and vectors["use_alt_endpoint"] is True
    assert vectors["alt_endpoint_url"].rstrip("/") == stage.bridge.url

    open_chat_with_past(stage)
    traffic = VectorTraffic(stage)
    use_chat_vectors(stage, True)
    try:
        vectorize_all(stage)
        prompt = send_and_read_prompt(stage, RECALLED)
    finally:
        use_chat_vectors(stage, False)
        traffic.wait_quiet()  # the reply's own vectorising, which ST starts a moment after it
        traffic.close()
        clear_chat(stage)
    block = recalled_block(prompt)
    by_user = PAST.index(RECALLED) % 2 == 0  # PAST alternates user and character
    speaker = page.js("(user) => SillyTavern.getContext()[user ? 'name1' : 'name2']", by_user)
    # The most similar message comes last (ST orders the block so); the same text is the most similar.
    assert block.splitlines()[-1] == f"{speaker}: {RECALLED}", block
    # Retrieved messages leave their place in the chat: the older copy is no longer where it was.
    assert prompt.count(RECALLED) == 2, prompt  # in the block, and as the new message


# --- Caption -----------------------------------------------------------------------------------------


class Recorder:
    """Between SillyTavern's server and the bridge: forwards every request and keeps both sides."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.exchanges: list[tuple[str, Any, Any]] = []
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._server = _ServerThread(app)
        self._server.start()
        self.url = f"http://127.0.0.1:{self._server.port}"

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        async with (aiohttp.ClientSession() as http,
                    http.request(request.method, self.target + request.path_qs, data=body,
                                 headers=headers) as reply):
            answer = await reply.read()
            self.exchanges.append((request.path, _json(body), _json(answer)))
            return web.Response(body=answer, status=reply.status, content_type=reply.content_type)

    def stop(self) -> None:
        self._server.stop()


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def point_caption_at(stage: Stage, url: str) -> None:
    """Caption's own endpoint (ST 1.19), or ST's KoboldCpp URL that ST 1.12's Caption uses."""
    stage.browser.js("""(url) => {
        if ($('#caption_altEndpoint_url').length) $('#caption_altEndpoint_url').val(url).trigger('input');
        else $('#koboldcpp_api_url_text').val(url).trigger('input');
    }""", url)


def test_caption_describes_an_attached_image_with_the_models_projector(stage: Stage, companions: Companions,
                                                                       tmp_path: Path) -> None:
    page = stage.browser
    ensure_connected(stage)
    bridge_call(stage, "POST", "/bridge/v1/load", {"model": companions.vision_model})
    wait_online(stage, companions.vision_model, timeout_s=90)
    page.wait_js("() => !window.stBridge.connecting")
    show_panel(stage)
    described = wait_companion_state(stage, "vision", "ready")
    assert described.startswith(f"sees images with {PROJECTOR}"), described
    press_companions_setup(stage)
    caption = saved_settings(stage, lambda s: s["extension_settings"].get("caption", {}).get("source")
                             == "multimodal")["extension_settings"]["caption"]
    assert caption["multimodal_api"] == "koboldcpp" and caption["multimodal_model"] == "koboldcpp_current"

    image = tmp_path / "forest.png"
    image.write_bytes(png(seed=5, size=(64, 48)))
    recorder = Recorder(stage.bridge.url)
    # ST 1.12's Caption goes where ST's KoboldCpp URL points; the panel, in automatic mode, would point that
    # back at the bridge (as after any change to the connection): a user who turned automatic off.
    page.js("() => { window.stBridge.settings.auto = false; }")
    point_caption_at(stage, recorder.url)
    try:
        open_chat(stage)
        before = page.js("() => SillyTavern.getContext().chat.length")
        page.page.set_input_files("#img_file", str(image))  # what picking a file in "Generate Caption" does
        # Caption shows an hourglass until the captioned message is in the chat and saved.
        page.wait_js("""(n) => SillyTavern.getContext().chat.length > n
            && !$('#send_picture .extensionsMenuExtensionButton').hasClass('fa-hourglass-half')""", 120,
                     arg=before)
        message = page.js("() => SillyTavern.getContext().chat.at(-1)")
    finally:
        point_caption_at(stage, stage.bridge.url)
        page.js("() => { window.stBridge.settings.auto = true; }")
        recorder.stop()
        clear_chat(stage)
    [(path, sent, answer)] = [e for e in recorder.exchanges if e[0].endswith("/chat/completions")]
    assert path == "/v1/chat/completions"
    parts = sent["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"]
    assert parts[1]["image_url"]["url"].startswith("data:image/")
    text = answer["choices"][0]["message"]["content"]
    assert text.strip()
    # The caption was written after the image's tokens: the prompt holds them beside the words.
    assert answer["usage"]["prompt_tokens"] > companion_models.IMAGE_TOKENS
    assert message["is_user"] is True and text.strip() in message["mes"], message["mes"]
    page.screenshot("caption")


def test_the_panel_drops_the_companions(stage: Stage, companions: Companions) -> None:
    page = stage.browser
    ensure_connected(stage)
    pick_embedding_in_panel(stage, companions.embedding)
    page.page.select_option("#st_bridge_embedding_pick", "")
    assert wait_companion_state(stage, "embedding", "empty") == "no embedding model"
    assert stage.bridge.status()["companions"]["embedding"]["state"] == "empty"

    bridge_call(stage, "POST", "/bridge/v1/load", {"model": companions.vision_model})
    wait_companion_state(stage, "vision", "ready", timeout_s=90)
    page.page.select_option("#st_bridge_vision_pick", "off")  # the chat model loads again without it
    assert wait_companion_state(stage, "vision", "empty", timeout_s=90) == "the chat model sees no images"
    assert stage.bridge.status()["companions"]["vision"]["projector"] is None
