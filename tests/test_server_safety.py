"""Safety of a real bridge: loopback by default, CORS for pages of this machine, requests refused from other
origins / with non-JSON bodies / with foreign Host headers, body size limit, model ids that are not paths,
and an API key whenever it listens beyond loopback. (Every endpoint against a foreign Host and Origin:
test_reach.py.)"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import aiohttp
import pytest

from tests.fixtures.server import REPO

ST_ORIGIN = "http://127.0.0.1:8000"


def raw_request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                timeout: float = 10, host: str = "127.0.0.1") -> tuple:
    """One request with exactly these headers (aiohttp would fill in Host itself)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in (headers or {}).items():
        connection.putheader(name, value)
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    reply = connection.getresponse()
    result = reply.status, dict(reply.headers), reply.read()
    connection.close()
    return result


async def test_cross_origin_text_plain_post_is_refused(bridge_server):
    # A form on any web page can send this without a preflight; it must not reach the model manager.
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.post(
            "/bridge/v1/unload",
            data='{"x":1}',
            headers={"Content-Type": "text/plain", "Origin": "http://evil.example"},
        ) as reply:
            assert reply.status == 403
            assert "origin" in (await reply.json())["error"]["message"]
        async with http.post(
            "/bridge/v1/unload", data="{}", headers={"Content-Type": "text/plain", "Origin": ST_ORIGIN}
        ) as reply:
            assert reply.status == 415  # even from ST's origin, only JSON
    assert bridge_server.status()["state"] == "ready"


def test_foreign_host_header_is_refused(bridge_server):
    status, _, body = raw_request(
        bridge_server.port,
        "POST",
        "/bridge/v1/unload",
        b"{}",
        {"Host": "attacker.example:5001", "Content-Type": "application/json"},
    )
    assert status == 403 and b"Host" in body
    # Reads too: a rebinding page must not learn paths and hardware, nor run generations.
    status, _, body = raw_request(bridge_server.port, "GET", "/v1/models",
                                  headers={"Host": "attacker.example"})
    assert status == 403 and b"does not name this machine" in body
    status, _, _ = raw_request(bridge_server.port, "GET", "/v1/models",
                               headers={"Host": f"127.0.0.1:{bridge_server.port}"})
    assert status == 200  # how ST's server calls it
    assert bridge_server.status()["state"] == "ready"


def test_huge_body_gets_413(bridge_server):
    status, _, body = raw_request(
        bridge_server.port,
        "POST",
        "/completion",
        b"x" * (20 * 1024 * 1024),
        {"Host": "127.0.0.1", "Content-Type": "application/json"},
    )
    assert status == 413 and b"MB" in body


@pytest.mark.parametrize("model", ["../secret", "a/../../etc/passwd", "/etc/passwd", "..\\x", "C:/x.gguf"])
async def test_model_ids_that_are_paths_get_400(bridge_server, model):
    async with (
        aiohttp.ClientSession(bridge_server.url) as http,
        http.post("/bridge/v1/load", json={"model": model}) as reply,
    ):
        assert reply.status == 400
        assert (await reply.json())["error"]["code"] == "unsafe_path"


@pytest.mark.parametrize("origin", [ST_ORIGIN, "http://localhost:8001", "https://127.0.0.1:3000",
                                    "http://[::1]:8000"])
async def test_cors_for_pages_of_this_machine_on_any_port(bridge_server, origin):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.options("/bridge/v1/load", headers=preflight | {"Origin": origin}) as reply:
            assert reply.status == 204
            assert reply.headers["Access-Control-Allow-Origin"] == origin
            assert "POST" in reply.headers["Access-Control-Allow-Methods"]
            assert "Content-Type" in reply.headers["Access-Control-Allow-Headers"]
        async with http.get("/bridge/v1/status", headers={"Origin": origin}) as reply:
            assert reply.status == 200
            assert reply.headers["Access-Control-Allow-Origin"] == origin


async def test_a_refused_origin_reads_why_and_what_allows_it(bridge_server):
    # The preflight passes (it changes nothing), so the page's real request is made and refused, with a
    # message it may read: the panel shows it instead of "not reachable".
    evil = "http://evil.example:8000"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.options("/bridge/v1/load", headers=preflight | {"Origin": evil}) as reply:
            assert reply.status == 204
        async with http.post("/bridge/v1/load", json={"model": "x"}, headers={"Origin": evil}) as reply:
            assert reply.status == 403
            assert reply.headers["Access-Control-Allow-Origin"] == evil
            error = (await reply.json())["error"]
    assert error["code"] == "origin_not_allowed"
    assert evil in error["message"] and "--allowed-origin http://evil.example:8000" in error["message"]
    assert bridge_server.status()["state"] == "ready"


async def test_allowed_origin_patterns_and_hosts(start_bridge):
    server = start_bridge("--model", "tiny-llama-Q4_K_M", "--allowed-origin", "http://st.lan:*",
                          "--allowed-origin", "https://st.example.org", "--allowed-host", "bridge.lan")
    cases = {"http://st.lan:8001": 200, "http://st.lan": 200, "https://st.lan:8000": 403,
             "https://st.example.org": 200, "https://st.example.org:8443": 403, "http://x.st.lan:8000": 403}
    for origin, expected in cases.items():
        status, headers, _ = raw_request(server.port, "GET", "/v1/models",
                                         headers={"Host": "127.0.0.1", "Origin": origin})
        assert status == expected, origin
        assert (headers.get("Access-Control-Allow-Origin") == origin) is True  # readable either way
    for host, expected in {"bridge.lan:5001": 200, "BRIDGE.LAN.": 200, "other.lan": 403}.items():
        status, _, _ = raw_request(server.port, "GET", "/v1/models", headers={"Host": host})
        assert status == expected, host


def test_listening_beyond_loopback_needs_a_key(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "1",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"ST_BRIDGE_CONFIG": str(tmp_path / "none.toml"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "API key" in result.stderr


async def test_api_key_is_required_when_set(start_bridge):
    server = start_bridge("--model", "tiny-llama-Q4_K_M", "--api-key", "sekrit")
    async with aiohttp.ClientSession(server.url) as http:
        async with http.get("/v1/models") as reply:
            assert reply.status == 401
            assert "API key" in (await reply.json())["error"]["message"]
        async with http.post(
            "/tokenize", json={"content": "hi"}, headers={"Authorization": "Bearer nope"}
        ) as reply:
            assert reply.status == 401
        bearer = {"Authorization": "Bearer sekrit"}  # how ST sends the API key field
        async with http.get("/v1/models", headers=bearer) as reply:
            assert reply.status == 200 and (await reply.json())["data"][0]["id"] == "tiny-llama-Q4_K_M"
        async with http.post("/tokenize", json={"content": "hi"}, headers=bearer) as reply:
            assert reply.status == 200


def test_config_file_and_env_feed_the_settings(tmp_path, monkeypatch):
    from bridge.config import load_settings

    config = tmp_path / "config.toml"
    config.write_text('port = 6001\nctx = 2048\nallowed_origins = ["http://st.lan:8000"]\n')
    monkeypatch.setenv("ST_BRIDGE_CONFIG", str(config))
    monkeypatch.setenv("ST_BRIDGE_CTX", "4096")
    settings = load_settings(port=None, kv_type="q8_0")
    assert (settings.port, settings.ctx, settings.kv_type) == (6001, 4096, "q8_0")  # flags > env > file
    assert settings.allowed_origins == ["http://st.lan:8000"]
    assert json.loads(settings.model_dump_json())["host"] == "127.0.0.1"
