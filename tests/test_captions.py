"""Image captions: a real bridge serving the tiny chat model with the tiny projector the fixtures write,
paired from the models folder, answering the request ST's Caption extension sends (shared/
st-backend-surface.md §1 (b)) and KoboldCpp's `images`, and refusing bad images with reasons."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import aiohttp
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.companion_models import IMAGE_TOKENS

VISION_MODEL = "tiny/vision-llama/vision-llama-Q8_0"


def png(seed: int = 1, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def data_url(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(raw).decode()}"


def caption_body(url: str, **extra: object) -> dict:
    """What ST 1.18's /api/openai/caption-image sends for source llamacpp (no max_tokens, no stream)."""
    return {"model": "llamacpp_current", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": url}}]}], **extra}


@pytest.fixture(scope="module")
def vision_bridge(tmp_path_factory, companion_models_dir):
    from tests.fixtures.server import start_server

    server = start_server(tmp_path_factory.mktemp("vision"), companion_models_dir, "--model", VISION_MODEL,
                          "--ctx", "512")
    yield server
    server.stop()


async def _post(server, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession(server.url) as http, http.post(
        path, json=body, headers={"Authorization": "Bearer "}
    ) as reply:
        return reply.status, await reply.json()


async def test_the_projector_beside_the_model_is_paired_and_planned(vision_bridge):
    status = vision_bridge.status()
    vision = status["companions"]["vision"]
    assert vision["projector"] == "mmproj-vision-llama-F32.gguf"
    assert vision["plan"]["weights_mib"] > 0 and vision["plan"]["device"] == "CPU"
    assert status["plan"]["companions"][0]["model_id"] == "tiny/vision-llama/mmproj-vision-llama-F32"
    async with aiohttp.ClientSession(vision_bridge.url) as http, http.get("/api/extra/version") as reply:
        assert (await reply.json())["vision"] is True
    async with aiohttp.ClientSession(vision_bridge.url) as http, http.get("/bridge/v1/models") as reply:
        ids = [m["id"] for m in (await reply.json())["models"]]
    assert VISION_MODEL in ids and not any("mmproj" in i for i in ids)  # a projector is no model


async def test_st_caption_request_is_answered_after_the_image_tokens(vision_bridge):
    body = caption_body(data_url(png()), temperature=0, max_tokens=8)
    status, reply = await _post(vision_bridge, "/v1/chat/completions", body)
    assert status == 200, reply
    content = reply["choices"][0]["message"]["content"]  # what ST reads
    assert isinstance(content, str) and reply["usage"]["completion_tokens"] > 0
    text_only = caption_body("", temperature=0, max_tokens=8)
    text_only["messages"][0]["content"][1] = {"type": "text", "text": ""}
    status, plain = await _post(vision_bridge, "/v1/chat/completions", text_only)
    assert status == 200, plain
    assert reply["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + IMAGE_TOKENS
    # ST's exact body: no temperature, no max_tokens, a placeholder model name
    status, st = await _post(vision_bridge, "/v1/chat/completions", caption_body(data_url(png(2), "jpeg")))
    assert status == 200 and isinstance(st["choices"][0]["message"]["content"], str)


async def test_the_image_changes_what_the_model_says(vision_bridge):
    replies = set()
    for seed in (1, 2, 3):
        body = caption_body(data_url(png(seed)), temperature=0, max_tokens=12)
        status, reply = await _post(vision_bridge, "/v1/chat/completions", body)
        assert status == 200
        replies.add(reply["choices"][0]["message"]["content"])
    assert len(replies) > 1


async def test_koboldcpp_images_field(vision_bridge):
    body = {"prompt": "Describe the picture:", "max_length": 6, "temperature": 0,
            "images": [base64.b64encode(png()).decode()]}
    status, reply = await _post(vision_bridge, "/api/v1/generate", body)
    assert status == 200, reply
    assert isinstance(reply["results"][0]["text"], str)


def _huge_png(width: int = 20000, height: int = 20000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize(("url", "words"), [
    (data_url(b"hello, I am not a picture at all"), "not an image"),
    (data_url(_huge_png()), "the largest accepted is 50 MP"),
    (data_url(_huge_png(9000, 7000)), "9000x7000"),
    (data_url(png())[:-5], "cut short"),
    ("data:image/png;base64," + base64.b64encode(png()[:300]).decode(), "truncated"),
    ("https://example.com/cat.png", "remote URL"),
    ("data:image/png;base64,!!!notbase64!!!", "not base64"),
])
async def test_bad_images_are_400s_that_say_why(vision_bridge, url, words):
    status, reply = await _post(vision_bridge, "/v1/chat/completions", caption_body(url))
    assert status == 400 and words in reply["error"]["message"], reply
    status, reply = await _post(vision_bridge, "/completion", {"prompt": "hi", "n_predict": 1})
    assert status == 200  # the model is still serving


async def test_an_image_for_a_model_without_projector_says_what_is_missing(bridge_server):
    status, reply = await _post(bridge_server, "/v1/chat/completions", caption_body(data_url(png())))
    assert status == 503 and "no vision projector" in reply["error"]["message"], reply
