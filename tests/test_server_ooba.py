"""ST's ooba type (text-generation-webui) against a real bridge: status with model info, `/v1/internal/*`
token counting, `/v1/completions` streamed and not with logprobs, disconnect; and OpenAI chat completions
rendered with the model's chat template."""

from __future__ import annotations

import time

import aiohttp

from tests.fixtures.server import (
    LONG_REPLY,
    assert_next_request_is_not_held_back,
    decode_rate,
    observed_bodies,
    st_extract_message,
    st_model_name,
    st_parse_stream,
    st_token_count,
)
from tests.fixtures.server import (
    st_body as observed_st_body,
)

TEXTS = ["Say hi", "Hello, world! How are you?", "*whispers* the night is long"]


def st_body(**changes: object) -> dict:
    """The body ST 1.12.6 sent for ooba, shortened for speed, with a fixed seed unless changed."""
    return observed_st_body("ooba", **({"seed": 21, "sampler_seed": 21} | changes))


async def test_st_sequence_ooba(bridge_server, tiny_vocab):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.get("/v1/models") as reply:
            assert st_model_name(await reply.json()) == "tiny-llama-Q8_0"
            assert reply.headers.get("X-Powered-By") != "Express"  # else ST skips the model info call
        async with http.get("/v1/internal/model/info") as reply:
            assert reply.status == 200 and (await reply.json())["model_name"] == "tiny-llama-Q8_0"
        for text in TEXTS:
            async with http.post("/v1/internal/encode", json={"text": text}) as reply:
                count, ids = st_token_count(await reply.json())
            assert ids == tiny_vocab.tokenize(text.encode(), add_bos=False, special=False) and count == len(
                ids
            )
        async with http.post("/v1/internal/token-count", json={"text": TEXTS[1]}) as reply:
            assert (await reply.json())["length"] == len(
                tiny_vocab.tokenize(TEXTS[1].encode(), add_bos=False)
            )
        async with http.post("/v1/completions", json=st_body()) as reply:
            data = await reply.json()
        async with http.post("/v1/completions", json=st_body(stream=True)) as reply:
            streamed = st_parse_stream(await reply.read())
    assert data["object"] == "text_completion" and data["model"] == "tiny-llama-Q8_0"
    assert data["choices"][0]["finish_reason"] in ("stop", "length")
    assert data["usage"]["completion_tokens"] > 0
    assert streamed.done and streamed.error is None and streamed.text == st_extract_message(data)


async def test_disconnect_stops_generation(slow_bridge):
    body = st_body(stream=True, max_new_tokens=LONG_REPLY, max_tokens=LONG_REPLY, n_predict=LONG_REPLY,
                   ban_eos_token=True)
    async with aiohttp.ClientSession(slow_bridge.url) as http:
        rate = await decode_rate(http)
        began = time.monotonic()
        reply = await http.post("/v1/completions", json=body)
        await reply.content.readuntil(b"\n\n")
        reply.close()  # what ST does for ooba: abort the fetch
        await assert_next_request_is_not_held_back(http, rate, time.monotonic() - began)


async def test_logprobs_in_st_shape(bridge_server):
    body = st_body(logprobs=3, n_probs=3, stream=True)
    async with (
        aiohttp.ClientSession(bridge_server.url) as http,
        http.post("/v1/completions", json=body) as reply,
    ):
        streamed = st_parse_stream(await reply.read())
    tokens = [e for e in streamed.events if e["choices"][0]["finish_reason"] is None]
    top = tokens[0]["choices"][0]["logprobs"]["top_logprobs"][0]  # ST reads this as {token: logprob}
    assert len(top) == 3 and all(isinstance(k, str) and v <= 0 for k, v in top.items())


async def test_decode_round_trip(bridge_server, tiny_vocab):
    ids = tiny_vocab.tokenize(b"hello world", add_bos=False, special=False)
    async with (
        aiohttp.ClientSession(bridge_server.url) as http,
        http.post("/v1/internal/decode", json={"tokens": ids}) as reply,
    ):
        assert (await reply.json())["text"].strip() == "hello world"


async def test_chat_completions_use_the_chat_template(bridge_server):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "seed": 1}
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.post("/v1/chat/completions", json=body) as reply:
            data = await reply.json()
        async with http.post("/v1/chat/completions", json=body | {"stream": True}) as reply:
            raw = (await reply.read()).decode()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["prompt_tokens"] > 5  # the template's role markers are part of the prompt
    chunks = [line for line in raw.split("\n\n") if line.startswith("data: {")]
    assert '"role": "assistant"' in chunks[0] and raw.rstrip().endswith("data: [DONE]")


# --- translation details (stand-in engine) ----------------------------------------------------------


async def test_st_ooba_body_translates(fake_bridge):
    client, engine = fake_bridge
    reply = await client.post("/v1/completions", json=observed_bodies()["ooba"] | {"logprobs": 5})
    assert reply.status == 200
    sampling = engine.requests[-1].sampling
    assert sampling.repeat_last_n == -1  # text-generation-webui: range 0 = all tokens
    assert sampling.n_probs == 5
    assert sampling.order[-1] == "temperature"  # temperature_last
    assert sampling.order.index("penalties") < sampling.order.index("dry") < sampling.order.index("top_k")


async def test_chat_prompt_is_rendered_with_the_template(fake_bridge):
    client, engine = fake_bridge
    engine.status().chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[bot]"
    )
    reply = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    )
    assert reply.status == 200
    assert engine.requests[-1].prompt == "[system]Be brief.[user]Hi[bot]"


async def test_openai_error_envelope(fake_bridge):
    client, _ = fake_bridge
    reply = await client.post("/v1/completions", json={"prompt": "x", "custom_token_bans": "1,two"})
    body = await reply.json()
    assert reply.status == 400
    assert (
        body["error"]["type"] == "invalid_request_error" and "custom_token_bans" in body["error"]["message"]
    )
