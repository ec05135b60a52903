"""What a user does in SillyTavern with the panel, as functions the browser tests share."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from tests.fixtures.sillytavern import Stage

ST_STATUS_ROUTE = "/api/backends/text-completions/status"


def online_status(stage: Stage) -> str:
    return stage.browser.js("() => SillyTavern.getContext().onlineStatus")


def wait_online(stage: Stage, model: str, timeout_s: float = 30) -> None:
    """Waits until SillyTavern reports `model` as its connected model."""
    stage.browser.wait_js("(m) => SillyTavern.getContext().onlineStatus === m", timeout_s, arg=model)


def wait_bridge_state(stage: Stage, state: str, timeout_s: float = 30) -> None:
    stage.browser.wait_js("(s) => document.querySelector('#st_bridge_link')?.dataset.state === s", timeout_s,
                          arg=state)


def show_panel(stage: Stage) -> None:
    """Opens SillyTavern's Extensions drawer (other clicks, like sending a message, close it)."""
    page = stage.browser.page
    if not page.is_visible("#st_bridge_connect"):
        page.click("#extensions-settings-button .drawer-toggle")
        page.wait_for_selector("#st_bridge_connect", state="visible")
    # ST slides its drawers open; a click during the slide can land beside its target.
    stage.browser.wait_js("() => !$(':animated').length"
                          " && document.getAnimations().every(a => a.playState !== 'running')")


def use_in_sillytavern(stage: Stage) -> None:
    """Presses "Use in SillyTavern" and waits for ST to connect to the bridge's loaded model."""
    model = stage.bridge.status()["model"]
    wait_bridge_state(stage, "ready")
    show_panel(stage)
    stage.browser.page.click("#st_bridge_connect")
    wait_online(stage, model)
    stage.browser.wait_js("() => !window.stBridge.connecting")


def ensure_connected(stage: Stage) -> None:
    if online_status(stage) != stage.bridge.status()["model"]:
        use_in_sillytavern(stage)


class StatusChecks:
    """Counts SillyTavern's connection checks (each one is a Connect) as the browser sends them."""

    def __init__(self, stage: Stage) -> None:
        self.count = 0
        self._page: Any = stage.browser.page
        self._page.on("request", self._seen)

    def _seen(self, request: Any) -> None:
        if request.url.endswith(ST_STATUS_ROUTE):
            self.count += 1

    def close(self) -> None:
        self._page.remove_listener("request", self._seen)


def open_remote_settings(stage: Stage) -> None:
    """Opens the panel's "Other machines and Docker" section (the Docker setting and the API key)."""
    show_panel(stage)
    page = stage.browser.page
    if not page.is_visible("#st_bridge_docker"):
        page.click("#st_bridge_panel .st-bridge-advanced > .inline-drawer-header")
        page.wait_for_selector("#st_bridge_docker", state="visible")


def type_into_panel(stage: Stage, field: str, value: str) -> None:
    """Types `value` into the panel's `#st_bridge_<field>` and leaves the field, which commits it."""
    page = stage.browser.page
    page.fill(f"#st_bridge_{field}", value)
    page.press(f"#st_bridge_{field}", "Tab")


def set_panel_checkbox(stage: Stage, field: str, checked: bool) -> None:
    stage.browser.page.set_checked(f"#st_bridge_{field}", checked)


def press_use_in_sillytavern(stage: Stage) -> None:
    """Presses "Use in SillyTavern" and waits until that connect has finished (online or not)."""
    page = stage.browser
    before = page.js("() => window.stBridge.reconnects")
    show_panel(stage)
    page.page.click("#st_bridge_connect")
    page.wait_js("(n) => window.stBridge.reconnects > n && !window.stBridge.connecting", 30, arg=before)


def saved_settings(stage: Stage, check: Any, timeout_s: float = 10) -> dict[str, Any]:
    """ST's settings.json once `check(settings)` holds (ST saves debounced, a second or so after a change).

    It waits through Playwright, not with sleep: Playwright handles the page's events (and routed requests,
    which stay paused until it does) only while it is called.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        settings = stage.st.settings()
        if check(settings) or time.monotonic() > deadline:
            return settings
        stage.browser.page.wait_for_timeout(200)


def bridge_call(stage: Stage, method: str, path: str, body: dict | None = None) -> dict:
    """A management call to the stage's bridge, as the panel makes it (JSON, the page's origin)."""
    request = urllib.request.Request(stage.bridge.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Origin": stage.st.origin})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def open_chat(stage: Stage) -> None:
    """The first character's chat, with at least its greeting shown."""
    page = stage.browser
    page.js("() => SillyTavern.getContext().selectCharacterById(0)")
    page.wait_js("() => SillyTavern.getContext().characterId !== undefined"
                 " && $('#send_textarea').is(':visible')")
    page.wait_js("() => SillyTavern.getContext().chat.length >= 1")  # the character's greeting
