"""SillyTavern in Docker and a bridge on another machine: the panel hands ST's server the address it can
reach and the bridge's API key, while the browser keeps talking to the bridge directly. Also: the panel
follows the bridge's `catalog_updated` and `models_changed` events."""

from __future__ import annotations

import json
import shutil
import threading
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser.steps import (
    ensure_connected,
    open_remote_settings,
    press_use_in_sillytavern,
    saved_settings,
    set_panel_checkbox,
    show_panel,
    type_into_panel,
    wait_bridge_state,
    wait_online,
)
from tests.fixtures.sillytavern import Stage

pytestmark = pytest.mark.browser

DOCKER_HOST = "host.docker.internal"
API_KEY = "remote-test-key-7f3a"
REMOTE_MODEL = "tiny-llama-Q6_K"  # no other browser test loads this quant, so ST's switch to it shows
DISCOVERED = "bartowski/tiny-llama-GGUF"  # a trusted uploader's repository, found by a catalog refresh


class DockerNetwork:
    """What Docker's network does for a container: ST's server reaches the host at host.docker.internal.

    That name does not resolve here, so each call the page makes to ST's server that has it reach a backend
    (its backends and remote tokenizer routes) and names host.docker.internal is sent on with the host's
    loopback address instead; the calls are kept to show what ST's server was told. Other calls, such as
    saving the settings, pass untouched.
    """

    def __init__(self, stage: Stage) -> None:
        self.page: Any = stage.browser.page
        self.st_url = stage.st.url
        self.rerouted: list[tuple[str, dict[str, Any]]] = []  # (ST route, request body)
        self.page.route(self._ours, self._reroute)

    def _ours(self, url: str) -> bool:
        return url.startswith((self.st_url + "/api/backends/", self.st_url + "/api/tokenizers/"))

    def _reroute(self, route: Any, request: Any) -> None:
        body = request.post_data
        if not body or DOCKER_HOST not in body:
            route.continue_()
            return
        self.rerouted.append((urlsplit(request.url).path, json.loads(body)))
        route.continue_(post_data=body.replace(DOCKER_HOST, "127.0.0.1"))

    def close(self) -> None:
        self.page.unroute(self._ours, self._reroute)


class BrowserRequests:
    """The URL and Authorization header of each request the page sends whose URL starts with `prefix`."""

    def __init__(self, stage: Stage, prefix: str = "") -> None:
        self.page: Any = stage.browser.page
        self.prefix = prefix
        self.seen: list[tuple[str, str | None]] = []
        self.page.on("request", self._seen)

    def _seen(self, request: Any) -> None:
        if request.url.startswith(self.prefix) and request.method != "OPTIONS":
            self.seen.append((request.url, request.headers.get("authorization")))

    def close(self) -> None:
        self.page.remove_listener("request", self._seen)


def st_server_url(settings: dict[str, Any], api_type: str = "koboldcpp") -> str:
    return settings["textgenerationwebui_settings"]["server_urls"].get(api_type, "").rstrip("/")


def test_sillytavern_in_docker_gets_host_docker_internal_the_panel_stays_on_loopback(stage: Stage) -> None:
    page = stage.browser
    ensure_connected(stage)
    model = stage.bridge.status()["model"]
    docker_url = f"http://{DOCKER_HOST}:{stage.bridge.port}"
    network = DockerNetwork(stage)
    everything = BrowserRequests(stage)
    try:
        open_remote_settings(stage)
        set_panel_checkbox(stage, "docker", True)
        press_use_in_sillytavern(stage)

        # ST's server was told host.docker.internal, in its field, in its saved settings and in its calls...
        assert page.js("() => $('#koboldcpp_api_url_text').val()").rstrip("/") == docker_url
        saved = saved_settings(stage, lambda s: st_server_url(s) == docker_url)
        assert st_server_url(saved) == docker_url
        status_calls = [body for path, body in network.rerouted if path.endswith("/text-completions/status")]
        assert status_calls, "ST did not check its connection"
        assert status_calls[-1]["api_server"].rstrip("/") == docker_url
        # ...and reached the bridge there: ST is online with the bridge's model.
        wait_online(stage, model)
        # The browser itself never used that name: the panel kept calling the bridge on loopback.
        assert not [url for url, _ in everything.seen if DOCKER_HOST in urlsplit(url).netloc]
        assert [url for url, _ in everything.seen if url.startswith(stage.bridge.url + "/bridge/v1/")]
        wait_bridge_state(stage, "ready")
        page.screenshot("docker")
    finally:
        network.close()
        everything.close()
        open_remote_settings(stage)
        set_panel_checkbox(stage, "docker", False)

    press_use_in_sillytavern(stage)  # back to a plain local setup for the tests after this one
    wait_online(stage, model)
    local = stage.bridge.url
    assert st_server_url(saved_settings(stage, lambda s: st_server_url(s) == local)) == local


def test_a_bridge_with_an_api_key_is_used_with_the_key_by_the_panel_and_by_sillytavern(stage: Stage) -> None:
    page = stage.browser
    remote = stage.start_second_bridge("--api-key", API_KEY, "--model", REMOTE_MODEL)
    to_remote = BrowserRequests(stage, remote.url + "/")
    try:
        show_panel(stage)
        # Off while the panel is re-pointed, so the one connect to the new bridge is the button's.
        set_panel_checkbox(stage, "auto", False)
        open_remote_settings(stage)
        # The key first: the local bridge ignores it, while the remote one would refuse calls without it.
        type_into_panel(stage, "api_key", API_KEY)
        type_into_panel(stage, "url", remote.url)
        wait_bridge_state(stage, "ready")
        assert page.js("() => $('#st_bridge_model_name').text()") == REMOTE_MODEL

        page.page.click("#st_bridge_connect")
        wait_online(stage, REMOTE_MODEL)  # ST's server reached the remote bridge: it sent the key too
        page.wait_js("() => !window.stBridge.connecting")

        assert to_remote.seen, "the panel sent nothing to the remote bridge"
        assert {auth for _, auth in to_remote.seen} == {f"Bearer {API_KEY}"}
        assert st_server_url(saved_settings(stage, lambda s: st_server_url(s) == remote.url)) == remote.url
        assert API_KEY in json.dumps(stage_secrets(stage)), "ST did not save the key in its secrets"

        # A generation through ST's server, which must send the key on every call to the bridge.
        reply = page.js("""async () => {
            const result = await SillyTavern.getContext()
                .executeSlashCommandsWithOptions('/genraw instruct=off Once upon a time');
            return result.pipe;
        }""")
        assert str(reply).strip(), "ST's generation through the remote bridge gave no text"
        page.screenshot("api-key")
    finally:
        to_remote.close()
        open_remote_settings(stage)
        type_into_panel(stage, "url", stage.bridge.url)  # back to the local bridge before the key goes
        type_into_panel(stage, "api_key", "")
        set_panel_checkbox(stage, "auto", True)
        ensure_connected(stage)
        remote.stop()
    assert page.js("() => localStorage.getItem('st-bridge.apiKey')") is None


def stage_secrets(stage: Stage) -> Any:
    """ST's saved API keys (1.12 keeps one value per key, 1.19 a list of labelled values)."""
    path = stage.st.data_root / "default-user" / "secrets.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_the_panel_follows_catalog_and_model_folder_changes(stage: Stage) -> None:
    page = stage.browser
    wait_bridge_state(stage, "ready")
    show_panel(stage)
    if not page.js("() => window.stBridge.candidates.length"):
        page.page.click("#st_bridge_recommend")
        page.page.wait_for_selector("#st_bridge_recommendations .st-bridge-candidate")

    # A real catalog refresh re-ranks the open list: the bridge restarts with a day-old catalog and refreshes
    # it from the stage's Hub, which holds its answer until the panel is back and shows its list, and which
    # now offers a repository of a trusted uploader: the refresh discovers it and announces it.
    quant_file = "tiny-llama-Q4_K_M.gguf"
    stage.hub.add_file(DISCOVERED, quant_file, stage.bridge.models_dir / quant_file)
    stage.hub.hold_listings = threading.Event()
    try:
        stage.restart_bridge(stale_catalog=True)
        wait_bridge_state(stage, "ready", timeout_s=60)
        page.wait_js("() => window.stBridge.linkUp && window.stBridge.candidates.length")
        recommend = stage.bridge.url + "/bridge/v1/recommend"
        with page.page.expect_request(lambda r: r.url.startswith(recommend), timeout=60000):
            stage.hub.hold_listings.set()  # the refresh goes on, finds the new repository, announces it
        repos = [m["repo"] for m in stage.bridge.get_json("/bridge/v1/catalog")["models"]]
        assert DISCOVERED in repos, repos
    finally:
        stage.hub.hold_listings.set()
        stage.hub.hold_listings = None
        stage.hub.repos.pop(DISCOVERED, None)
        stage.restart_bridge()  # with the stage's own catalog again, for the tests after this one
        wait_bridge_state(stage, "ready", timeout_s=60)
    page.page.wait_for_selector("#st_bridge_recommendations .st-bridge-candidate")

    # A file dropped into the models folder reaches the panel through the bridge's own event.
    extra = stage.bridge.models_dir / "dropped-in-Q4_K_M.gguf"
    shutil.copyfile(stage.bridge.models_dir / "tiny-llama-Q4_K_M.gguf", extra)
    try:
        page.wait_js("() => window.stBridge.models.some((m) => m.id === 'dropped-in-Q4_K_M')", 20)
    finally:
        extra.unlink()
    page.wait_js("() => !window.stBridge.models.some((m) => m.id === 'dropped-in-Q4_K_M')", 20)
