"""The panel wherever SillyTavern runs: on another port, opened from another device on the home network,
in a Docker container, and with the bridge on another machine. Real SillyTavern (each pinned release),
real bridges, and the other devices made as network namespaces (tests/fixtures/netns.py); the README's
Docker, LAN and remote sections are these steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.steps import (
    open_remote_settings,
    set_panel_checkbox,
    show_panel,
    type_into_panel,
    use_in_sillytavern,
    wait_bridge_state,
    wait_online,
)
from tests.fixtures.netns import Namespace, PortForward
from tests.fixtures.server import BridgeServer, free_port, start_server
from tests.fixtures.sillytavern import (
    BRIDGE_CTX,
    CHROMIUM,
    CHROMIUM_ARGS,
    BrowserPage,
    SillyTavern,
    Stage,
    open_panel,
    start_sillytavern,
)
from tests.test_server_safety import raw_request

pytestmark = pytest.mark.browser

API_KEY = "reach-test-key-5d1c"
BOX_NAME = "bridgebox.test"  # the remote bridge's name, given to it with --allowed-host


@dataclasses.dataclass
class Scene:
    """What one test set up beside the session's stage; everything is stopped in teardown."""

    stage: Stage
    workdir: Path
    stops: list[Any] = dataclasses.field(default_factory=list)

    def bridge(self, *args: str, port: int | None = None, prefix: tuple[str, ...] = (),
               host: str = "127.0.0.1") -> BridgeServer:
        """A bridge with the tiny model and no --allowed-origin: only what the test gives it."""
        n = len(self.stops)
        models = self.workdir / f"models-{n}"
        shutil.copytree(self.stage.bridge.models_dir, models, ignore=shutil.ignore_patterns("*.incomplete"))
        (self.workdir / f"bridge-{n}").mkdir()
        port = port or free_port()
        # A later --port wins in argparse: the bridge listens where the test says, and the handle is told.
        server = start_server(self.workdir / f"bridge-{n}", models, "--model", "tiny-llama-Q8_0", "--ctx",
                              str(BRIDGE_CTX), "--port", str(port), *args, prefix=prefix, host=host,
                              wait=None)
        server.port = port
        self.stops.append(server)
        server.wait_for(("ready",))
        return server

    def sillytavern(self, **options: Any) -> SillyTavern:
        folder = self.workdir / f"st-{len(self.stops)}"
        folder.mkdir()
        st = start_sillytavern(self.stage.st.version, folder, free_port(), **options)
        self.stops.append(st)
        return st

    def browser(self, ns: Namespace | None = None) -> BrowserPage:
        """A new browser page: in this machine's Chromium, or in a Chromium running inside `ns`."""
        own = self.stage.browser.page.context.browser
        viewport = {"width": 1400, "height": 1000}
        if ns is None:
            context = own.new_context(viewport=viewport)
        else:
            wrapper = self.workdir / f"chromium-{ns.name}"
            wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns.name} {CHROMIUM} "$@"\n')
            wrapper.chmod(0o755)
            browser = own.browser_type.launch(executable_path=str(wrapper), args=CHROMIUM_ARGS)
            self.stops.append(browser)
            context = browser.new_context(viewport=viewport)
        self.stops.append(context)
        page = BrowserPage(context.new_page(), self.stage.st.version)
        page.page.on("pageerror", lambda e: page.console_errors.append(f"page error: {e}"))
        return page

    def open(self, st: SillyTavern, bridge: BridgeServer, page: BrowserPage, url: str | None = None) -> Stage:
        """SillyTavern's page at `url` (default: st.url) with the panel open and pointed at `bridge`."""
        scene = Stage(dataclasses.replace(st, host=_host(url or st.url), port=_port(url or st.url)),
                      bridge, page, self.stage.hub, self.workdir)
        open_panel(scene)
        return scene

    def close(self) -> None:
        for thing in reversed(self.stops):
            with contextlib.suppress(Exception):  # teardown goes on; the test's own failure is the one to see
                thing.close() if hasattr(thing, "close") else thing.stop()


def _host(url: str) -> str:
    return url.split("//", 1)[1].rsplit(":", 1)[0]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


@pytest.fixture
def scene(stage: Stage, tmp_path: Path) -> Iterator[Scene]:
    built = Scene(stage, tmp_path)
    yield built
    built.close()


def requests_to(page: BrowserPage, prefix: str) -> list[str]:
    seen: list[str] = []
    page.page.on("request", lambda r: r.url.startswith(prefix) and seen.append(r.url))
    return seen


def panel_error(page: BrowserPage, contains: str, timeout_s: float = 30) -> str:
    return page.wait_js("(t) => { const e = document.querySelector('#st_bridge_error');"
                        " return e && !e.hidden && e.textContent.includes(t) && e.textContent; }", timeout_s,
                        arg=contains)


def switch_quant(page: BrowserPage, quant: str) -> None:
    """What clicking the quant's chip does, once the panel lists the loaded model's quants."""
    page.wait_js("(q) => window.stBridge.quants.some((x) => x.quant === q && x.id)", 30, arg=quant)
    page.js("(q) => window.stBridge.switchQuant(q)", quant)


def generate(page: BrowserPage) -> str:
    return page.js("""async () => (await SillyTavern.getContext()
        .executeSlashCommandsWithOptions('/genraw instruct=off Once upon a time')).pipe""")


CLIENT_SCRIPT = """
import json, sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[2]))
try:
    reply = urllib.request.urlopen(req, timeout=5)
    print(reply.status); print(reply.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
except OSError as e:
    print(0); print(e)
"""


def in_namespace(ns: Namespace, url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET `url` from a client inside `ns` (a container, another device)."""
    code = CLIENT_SCRIPT
    done = subprocess.run(ns.command(sys.executable, "-c", code, url, json.dumps(headers or {})),
                          capture_output=True, text=True, timeout=30)
    status, _, body = done.stdout.partition("\n")
    return int(status or 0), body


# --- 1. SillyTavern on another port, and pages the bridge does not know --------------------------------


def test_sillytavern_on_another_port_works_with_a_bridge_given_no_origin(scene: Scene) -> None:
    stage = scene.stage
    assert stage.st.port != 8000
    bridge = scene.bridge()  # no --allowed-origin: pages of this machine's loopback on any port pass
    st = scene.sillytavern()
    view = scene.open(st, bridge, scene.browser())
    wait_bridge_state(view, "ready")
    use_in_sillytavern(view)
    assert str(generate(view.browser)).strip()
    assert view.browser.console_errors == []


def test_a_page_the_bridge_refuses_shows_why_and_the_setting_that_allows_it(scene: Scene, netns: Any) -> None:
    lan = netns()  # gives this machine an address that is not loopback (the veth's end)
    bridge = scene.bridge()
    st = scene.sillytavern(listen=lan.gateway)
    page = scene.browser()
    view = scene.open(st, bridge, page)
    origin = f"http://{lan.gateway}:{st.port}"
    open_remote_settings(view)
    page.page.select_option("#st_bridge_route", "direct")  # this browser calls the bridge itself
    message = panel_error(page, "may not use this bridge")
    assert origin in message and f"--allowed-origin http://{lan.gateway}:{st.port}" in message
    assert "not reachable" not in message
    page.screenshot("refused-origin")

    bridge.stop()  # restarted on the same port with the setting, as the message says
    scene.bridge("--allowed-origin", f"http://{lan.gateway}:*", port=bridge.port)
    page.page.evaluate("() => window.stBridge.retarget()")
    wait_bridge_state(view, "ready", 60)
    assert page.js("() => $('#st_bridge_error').prop('hidden')")


# --- 2. SillyTavern opened from a phone on the home network -------------------------------------------


def test_a_phone_on_the_lan_uses_the_panel_through_sillytaverns_server(scene: Scene, netns: Any) -> None:
    phone = netns()
    bridge = scene.bridge()  # on loopback, as always: nothing new listens on the network
    # SillyTavern with `listen: true` on the home network (here: the address the phone can reach).
    st = scene.sillytavern(listen=phone.gateway)
    page = scene.browser(phone)
    view = scene.open(st, bridge, page)
    message = panel_error(page, "enableCorsProxy")  # README step: turn SillyTavern's proxy on
    assert "config.yaml" in message
    page.page.goto("about:blank")  # the user restarts SillyTavern, then reloads its page
    st.stop()

    st = scene.sillytavern(listen=phone.gateway, extra=("--corsProxy", "true"))
    from_phone = requests_to(page, "http://127.0.0.1")
    view = scene.open(st, bridge, page)
    wait_bridge_state(view, "ready", 60)
    assert page.js("() => $('#st_bridge_model_name').text()") == "tiny-llama-Q8_0"
    assert "through SillyTavern" in page.js("() => $('#st_bridge_route_state').text()")

    use_in_sillytavern(view)  # ST's server reaches the bridge on its own loopback
    assert str(generate(page)).strip()
    switch_quant(page, "Q6_K")  # a management call, through ST's server
    wait_online(view, "tiny-llama-Q6_K", 60)
    assert bridge.status()["model"] == "tiny-llama-Q6_K"
    assert from_phone == [], "the phone's browser called its own loopback"
    page.screenshot("phone")
    assert page.console_errors == []


# --- 3. SillyTavern in Docker -------------------------------------------------------------------------


def test_sillytavern_in_a_container_reaches_the_bridge_at_host_docker_internal(scene: Scene,
                                                                               netns: Any) -> None:
    container = netns(docker=True)  # a Docker-style bridge network; host.docker.internal -> its gateway
    plain = scene.bridge()
    status, _ = in_namespace(container, f"http://host.docker.internal:{plain.port}/v1/models")
    assert status == 0  # a bridge on loopback only: a container cannot reach it
    plain.stop()

    bridge = scene.bridge("--docker")  # README: `st-bridge serve --docker`
    assert f"also listening on {container.gateway}" in bridge.log()
    status, body = in_namespace(container, f"http://host.docker.internal:{bridge.port}/v1/models")
    assert status == 200 and "tiny-llama-Q8_0" in body

    # SillyTavern inside the container, its port published on this machine's loopback (`-p`).
    st = scene.sillytavern(listen="0.0.0.0", reach_at=container.address, prefix=tuple(container.command()))
    published = PortForward((container.address, st.port))
    scene.stops.append(published)
    page = scene.browser()
    view = scene.open(st, bridge, page, url=f"http://127.0.0.1:{published.port}")
    open_remote_settings(view)
    set_panel_checkbox(view, "docker", True)
    use_in_sillytavern(view)
    assert page.js("() => $('#koboldcpp_api_url_text').val()").rstrip("/") == \
        f"http://host.docker.internal:{bridge.port}"
    assert str(generate(page)).strip()
    page.screenshot("docker-netns")
    assert page.console_errors == []


def test_the_docker_gateway_answers_containers_only(scene: Scene, netns: Any) -> None:
    container, lan = netns(docker=True), netns()
    bridge = scene.bridge("--docker")
    # A device on the LAN that routes the gateway address through this machine reaches the port (the
    # kernel accepts packets for any of its addresses on any interface); the bridge refuses it.
    route = lan.command("ip", "route", "add", f"{container.gateway}/32", "via", lan.gateway)
    subprocess.run(route, check=True)
    status, body = in_namespace(lan, f"http://{container.gateway}:{bridge.port}/v1/models")
    assert status == 403 and "Docker containers only" in body
    status, _ = in_namespace(container, f"http://{container.gateway}:{bridge.port}/v1/models")
    assert status == 200


# --- 4. A bridge on another machine -------------------------------------------------------------------


def test_a_bridge_on_another_machine_is_managed_by_address_and_name_with_its_key(scene: Scene,
                                                                               netns: Any) -> None:
    box = netns()
    bridge = scene.bridge("--host", "0.0.0.0", "--api-key", API_KEY, "--allowed-host", BOX_NAME,
                          prefix=tuple(box.command()), host=box.address)
    key = {"Authorization": f"Bearer {API_KEY}"}
    for host, expected in {f"{box.address}:{bridge.port}": 200, BOX_NAME: 200, "other.test": 403}.items():
        status, _, _ = raw_request(bridge.port, "GET", "/bridge/v1/status", headers={"Host": host} | key,
                                   host=box.address)
        assert status == expected, host
    status, _, _ = raw_request(bridge.port, "POST", "/bridge/v1/load", b'{"quant": "Q5_K_M"}',
                               {"Host": BOX_NAME, "Content-Type": "application/json"} | key, timeout=60,
                               host=box.address)
    assert status == 200  # management by name
    status, _, _ = raw_request(bridge.port, "GET", "/v1/models", headers={"Host": box.address},
                               host=box.address)
    assert status == 401  # and nothing without the key

    page = scene.browser()
    st = scene.sillytavern()
    view = scene.open(st, bridge, page)
    open_remote_settings(view)
    type_into_panel(view, "api_key", API_KEY)
    view.browser.page.evaluate("() => window.stBridge.retarget()")
    wait_bridge_state(view, "ready")
    for quant in ("Q4_K_M", "Q8_0"):  # quant switches, by address, from the panel
        switch_quant(page, quant)
        page.wait_js("(m) => window.stBridge.status?.model === m"
                     " && window.stBridge.status?.state === 'ready'", 60, arg=f"tiny-llama-{quant}")
    show_panel(view)
    use_in_sillytavern(view)  # ST's server uses the key too
    assert str(generate(page)).strip()
    page.js("() => window.stBridge.unload()")
    page.wait_js("() => window.stBridge.status?.state === 'empty'", 30)
    assert bridge.status()["state"] == "empty"
    page.screenshot("remote-netns")
    assert page.console_errors == []
