"""`n` through the dialects, read the way SillyTavern 1.19 reads it (multi-swipe, ST PR #4869).

llama.cpp (`/completion`): streamed chunks with `index` > 0 are appended to swipe `index - 1`
(textgen-settings.js, generateTextGenWithStreaming); not streamed, the answer is an array whose first item
is the message and the rest the swipes (script.js, extractMultiSwipes). The OpenAI endpoints answer with
one choice per reply, streamed chunks carrying the choice's index.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp

from tests.fixtures.server import st_body


def st_stream(raw: bytes) -> tuple[str, list[str]]:
    """ST 1.19's reading of a text-completion stream: (message text, swipes)."""
    text, swipes = "", []
    for event in re.split(r"\r\n\r\n|\n\n|\r\r", raw.decode()):
        lines = [line[5:].lstrip(" ") for line in event.splitlines() if line.startswith("data:")]
        if not lines or lines[0] == "[DONE]":
            continue
        data = json.loads("\n".join(lines))
        assert "error" not in data, data
        choice = (data.get("choices") or [{}])[0]
        if choice.get("index", 0) > 0:
            i = choice["index"] - 1
            swipes += [""] * (i + 1 - len(swipes))
            swipes[i] += choice.get("text") or ""
        elif data.get("index", 0) > 0:
            i = data["index"] - 1
            swipes += [""] * (i + 1 - len(swipes))
            swipes[i] += data.get("content") or ""
        else:
            text += choice.get("text") or data.get("content") or ""
    return text, swipes


def body(api_type: str, n: int, *, stream: bool, length: int = 12) -> dict[str, Any]:
    return st_body(api_type, length, n=n, stream=stream, ignore_eos=True, ban_eos_token=True)


async def test_llamacpp_streams_three_swipes_with_their_index(bridge_server) -> None:
    async with (aiohttp.ClientSession(bridge_server.url) as http,
                http.post("/completion", json=body("llamacpp", 3, stream=True)) as reply):
        assert reply.status == 200
        text, swipes = st_stream(await reply.read())
    assert text and len(swipes) == 2 and all(swipes)
    assert len({text, *swipes}) == 3


async def test_llamacpp_answers_an_array_without_streaming(bridge_server) -> None:
    async with (aiohttp.ClientSession(bridge_server.url) as http,
                http.post("/completion", json=body("llamacpp", 3, stream=False)) as reply):
        data = await reply.json()
    assert isinstance(data, list) and [d["index"] for d in data] == [0, 1, 2]
    assert all(d["content"] and d["stop"] is True for d in data)
    # ST: the message is data[0].content, swipes are data[1..].content.
    assert data[0]["tokens_evaluated"] > 0 and data[0]["timings"]["predicted_n"] == 3 * 12
    single = await _single(bridge_server)
    assert isinstance(single, dict)  # n = 1 (or absent) keeps the object answer


async def _single(server) -> Any:
    async with (aiohttp.ClientSession(server.url) as http,
                http.post("/completion", json=body("llamacpp", 1, stream=False)) as reply):
        return await reply.json()


async def test_openai_completions_one_choice_per_reply(bridge_server) -> None:
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.post("/v1/completions", json=body("ooba", 2, stream=False)) as reply:
            data = await reply.json()
        async with http.post("/v1/completions", json=body("ooba", 2, stream=True)) as reply:
            text, swipes = st_stream(await reply.read())
    assert [c["index"] for c in data["choices"]] == [0, 1] and all(c["text"] for c in data["choices"])
    assert text and len(swipes) == 1 and swipes[0]


async def test_chat_completions_one_choice_per_reply(bridge_server) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    async with aiohttp.ClientSession(bridge_server.url) as http:
        request = {"messages": messages, "n": 2, "max_tokens": 8, "ignore_eos": True}
        async with http.post("/v1/chat/completions", json=request) as reply:
            data = await reply.json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert all(c["message"]["content"] for c in data["choices"])


async def test_too_many_swipes_are_refused(bridge_server) -> None:
    async with (aiohttp.ClientSession(bridge_server.url) as http,
                http.post("/completion", json=body("llamacpp", 17, stream=False)) as reply):
        assert reply.status == 400
        assert "n" in (await reply.json())["error"]["message"]
