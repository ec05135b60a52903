"""Safety of a real bridge: loopback by default, CORS for ST's origin, mutating management calls refused
from other origins / non-JSON bodies / foreign Host headers, body size limit, model ids that are not
paths, and an API key whenever it listens beyond loopback."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import aiohttp
import pytest

from tests.fixtures.server import REPO

ST_ORIGIN = "http://127.0.0.1:8000"


def raw_request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple:
    """One request with exactly these headers (aiohttp would fill in Host itself)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
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
            assert reply.status == 403  # even from ST's origin, only JSON
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
    status, _, _ = raw_request(bridge_server.port, "GET", "/v1/models", headers={"Host": "attacker.example"})
    assert status == 200  # reading is harmless; ST's status check must always work
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


async def test_cors_preflight_for_st_and_not_for_others(bridge_server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.options("/bridge/v1/load", headers=preflight | {"Origin": ST_ORIGIN}) as reply:
            assert reply.status == 204
            assert reply.headers["Access-Control-Allow-Origin"] == ST_ORIGIN
            assert "POST" in reply.headers["Access-Control-Allow-Methods"]
            assert "Content-Type" in reply.headers["Access-Control-Allow-Headers"]
        async with http.options(
            "/bridge/v1/load", headers=preflight | {"Origin": "http://evil.example"}
        ) as reply:
            assert reply.status == 403 and "Access-Control-Allow-Origin" not in reply.headers
        async with http.get("/bridge/v1/status", headers={"Origin": ST_ORIGIN}) as reply:
            assert reply.headers["Access-Control-Allow-Origin"] == ST_ORIGIN


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
