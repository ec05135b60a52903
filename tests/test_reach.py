"""Who may reach the bridge (bridge/reach.py): the origin and Host rules as functions, and every endpoint of a
real bridge refused, with nothing changed, for a foreign Host (DNS rebinding) and for a foreign Origin."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.api.app import create_app
from bridge.config import Settings
from bridge.reach import (
    DockerNetwork,
    HostCheck,
    Reach,
    interface_addresses,
    origin_allowed,
    own_names,
    parse_origin_pattern,
    split_host,
)
from tests.fixtures.server import FakeEngine
from tests.test_server_safety import raw_request

# A body each POST endpoint would act on, were it let through.
BODIES: dict[str, dict[str, Any]] = {
    "/bridge/v1/load": {"model": "tiny-llama-Q4_K_M"},
    "/bridge/v1/downloads": {"repo": "st-bridge-test/tiny-llama-GGUF", "file": "tiny-llama-Q6_K.gguf"},
    "/bridge/v1/unload": {},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/internal/decode": {"tokens": [1, 2]},
    "/detokenize": {"tokens": [1, 2]},
    "/api/extra/detokenize": {"ids": [1, 2]},
}
DEFAULT_BODY = {"prompt": "Once upon a time", "n_predict": 4, "max_tokens": 4, "text": "hi", "content": "hi"}
PLACEHOLDERS = {"{id}": "tiny-llama-Q4_K_M"}


def all_endpoints() -> list[tuple[str, str]]:
    """(method, path) of every route the bridge serves, placeholders filled with a real model id."""
    app = create_app(Settings(data_dir=Path("/nonexistent-st-bridge")), engine=FakeEngine())
    found = set()
    for route in app.router.routes():
        path = route.resource.canonical
        for placeholder, value in PLACEHOLDERS.items():
            path = path.replace(placeholder, value)
        found.add((route.method, path))
    return sorted(found)


ENDPOINTS = all_endpoints()


def test_every_endpoint_is_listed() -> None:
    paths = {path for _, path in ENDPOINTS}
    assert {"/completion", "/v1/completions", "/api/extra/abort", "/bridge/v1/events", "/tokenize",
            "/bridge/v1/status", "/bridge/v1/models/tiny-llama-Q4_K_M/quants"} <= paths
    assert len(ENDPOINTS) > 50


def _send(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    body = b""
    if method in ("POST", "DELETE"):
        body = json.dumps(BODIES.get(path, DEFAULT_BODY)).encode()
        headers = headers | {"Content-Type": "application/json"}
    status, _, raw = raw_request(port, method, path, body, headers)
    return status, json.loads(raw) if raw else {}


def _error_code(reply: dict[str, Any]) -> str:
    error = reply.get("error", {})
    return str(error.get("code") if isinstance(error.get("code"), str) else error.get("type", ""))


def _unchanged(server: Any) -> None:
    status = server.status()
    assert status["state"] == "ready" and status["model"] == "tiny-llama-Q8_0"
    assert (server.models_dir / "tiny-llama-Q4_K_M.gguf").is_file()
    assert server.get_json("/bridge/v1/downloads") == {"downloads": []}


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_endpoint_refuses_a_host_that_is_not_this_machine(bridge_server, method, path) -> None:
    # What a page whose DNS name was rebound to 127.0.0.1 sends: its own name, no Origin (same-origin).
    status, reply = _send(bridge_server.port, method, path, {"Host": f"rebound.example:{bridge_server.port}"})
    assert status == 403, (method, path, reply)
    if method != "HEAD":
        assert "does not name this machine" in json.dumps(reply)
    _unchanged(bridge_server)


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_endpoint_refuses_a_foreign_origin(bridge_server, method, path) -> None:
    headers = {"Host": f"127.0.0.1:{bridge_server.port}", "Origin": "http://evil.example"}
    status, reply = _send(bridge_server.port, method, path, headers)
    assert status == 403, (method, path, reply)
    if method != "HEAD":
        assert "http://evil.example" in json.dumps(reply) and "--allowed-origin" in json.dumps(reply)
    _unchanged(bridge_server)


def test_sillytavern_servers_requests_carry_no_origin_and_pass(bridge_server) -> None:
    host = {"Host": f"127.0.0.1:{bridge_server.port}"}
    status, reply = _send(bridge_server.port, "POST", "/tokenize", host)
    assert status == 200 and reply["tokens"]


def test_null_origin_is_refused(bridge_server) -> None:
    status, _ = _send(bridge_server.port, "GET", "/v1/models",
                      {"Host": f"127.0.0.1:{bridge_server.port}", "Origin": "null"})
    assert status == 403


# --- the rules as functions ---------------------------------------------------------------------------


@pytest.mark.parametrize(("origin", "allowed"), [
    ("http://127.0.0.1:8000", True), ("http://127.0.0.1:8001", True), ("https://localhost:3000", True),
    ("http://[::1]:8000", True), ("http://127.5.6.7", True), ("http://st.localhost:8000", True),
    ("http://192.168.1.20:8000", False), ("http://localhost.evil.example", False), ("null", False),
    ("file://", False), ("http://127.0.0.1.evil.example:8000", False), ("ftp://127.0.0.1", False),
])
def test_loopback_pages_on_any_port_are_allowed_by_default(origin: str, allowed: bool) -> None:
    assert origin_allowed(origin, ()) is allowed


def test_origin_patterns() -> None:
    patterns = [parse_origin_pattern(p) for p in ("http://192.168.1.20:8000", "http://st.lan:*",
                                                  "https://st.example.org")]
    assert origin_allowed("http://192.168.1.20:8000", patterns)
    assert not origin_allowed("http://192.168.1.20:8001", patterns)
    assert origin_allowed("http://st.lan:1234", patterns) and origin_allowed("http://ST.LAN", patterns)
    assert origin_allowed("https://st.example.org:443", patterns)
    assert not origin_allowed("http://st.example.org", patterns)
    for bad in ("st.lan", "http://st.lan:port", "http://", "http://st.lan/path", "*"):
        with pytest.raises(ValueError, match=r"origin pattern|port"):
            parse_origin_pattern(bad)


def test_a_bad_origin_pattern_is_a_settings_error(tmp_path: Path) -> None:
    from bridge.config import load_settings
    from bridge.errors import BadRequest

    with pytest.raises(BadRequest, match="allowed_origins"):
        load_settings(data_dir=tmp_path, allowed_origins=["192.168.1.20:8000"])


@pytest.mark.parametrize(("header", "host"), [
    ("127.0.0.1:5001", "127.0.0.1"), ("[::1]:5001", "::1"), ("[fe80::1%eth0]:5001", "fe80::1"),
    ("Example.LAN.:80", "example.lan"), ("example.lan", "example.lan"), ("::1", "::1"),
])
def test_split_host(header: str, host: str) -> None:
    assert split_host(header) == host


def test_the_host_check_knows_this_machine() -> None:
    check = HostCheck(extra_names=frozenset({"bridge.lan"}))
    own = socket.gethostname()
    addresses = interface_addresses()
    for header in ("127.0.0.1:5001", "localhost", "[::1]:5001", "host.docker.internal:5001", "bridge.lan",
                   own, f"{own.split('.')[0]}.local:5001", *(f"[{a}]" if ":" in a else a for a in addresses)):
        assert check.allows(header), header
    for header in ("rebound.example", "10.255.255.254:5001", "bridge.lan.evil.example",
                   "localhost.evil.example"):
        assert not check.allows(header), header
    assert check.allows(None)  # HTTP/1.0 without a Host header: not a browser


def test_a_slow_resolver_does_not_hold_up_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """getfqdn() on a Mac without a reachable DNS server blocks for seconds: the names come without it."""
    monkeypatch.setattr(socket, "getfqdn", lambda *_: time.sleep(3) or "slow.example.lan")
    started = time.monotonic()
    names = own_names(fqdn_timeout_s=0.2)
    assert time.monotonic() - started < 1.5
    assert socket.gethostname().lower() in names and "slow.example.lan" not in names
    monkeypatch.setattr(socket, "getfqdn", lambda *_: "quick.example.lan")
    assert "quick.example.lan" in own_names(fqdn_timeout_s=2)


def test_docker_gateways_answer_only_their_networks() -> None:
    net = DockerNetwork("docker0", "172.17.0.1", ipaddress.ip_network("172.17.0.0/16"))
    reach = Reach(docker=(net,))
    assert reach.docker_gateways == ["172.17.0.1"]
    assert reach.peer_allowed("172.17.0.1", "172.17.0.2")
    assert reach.peer_allowed("172.17.0.1", "::ffff:172.17.0.9")
    assert not reach.peer_allowed("172.17.0.1", "192.168.1.50")  # the LAN, routed to the gateway address
    assert reach.peer_allowed("127.0.0.1", "127.0.0.1")  # other listeners: no peer rule


def test_the_readme_gives_the_steps_the_browser_tests_run() -> None:
    """README's Docker, LAN and remote steps, and tests/browser/test_reach.py running the same ones."""
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    steps = (repo / "tests" / "browser" / "test_reach.py").read_text()
    for documented, run in [
        ("st-bridge serve --docker", '"--docker"'),
        ("host.docker.internal:host-gateway", "netns(docker=True)"),
        ("enableCorsProxy: true", '"--corsProxy", "true"'),
        ("`--corsProxy true`", '"--corsProxy", "true"'),
        ("st-bridge serve --host 0.0.0.0 --api-key <key>", '"--host", "0.0.0.0", "--api-key"'),
        ("--allowed-host <name>", '"--allowed-host"'),
        ("--allowed-origin http://192.168.1.20:*", '"--allowed-origin", f"http://{lan.gateway}:*"'),
        ("**SillyTavern runs in Docker**", 'set_panel_checkbox(view, "docker", True)'),
    ]:
        assert documented in readme, documented
        assert run in steps, run
