"""ST's koboldcpp type against a real bridge: status, token counts, generation streamed and not, abort;
the KoboldAI native API; and how KoboldCpp's sampler fields translate."""

from __future__ import annotations

import asyncio
import json
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

TEXTS = ["Say hi", "the knight and the dragon", "Once upon a time, in a castle by the moon,"]


def st_body(**changes: object) -> dict:
    """The body ST 1.12.6 sent for koboldcpp, shortened for speed, with a fixed seed unless changed."""
    return observed_st_body("koboldcpp", **({"seed": 7, "sampler_seed": 7} | changes))


async def test_st_sequence_koboldcpp(bridge_server, tiny_vocab):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.get("/v1/models") as reply:
            assert reply.status == 200
            assert "X-Powered-By" not in reply.headers
            assert st_model_name(await reply.json()) == "tiny-llama-Q8_0"
        for text in TEXTS:
            async with http.post("/api/extra/tokencount", json={"prompt": text}) as reply:
                count, ids = st_token_count(await reply.json())
            assert ids == tiny_vocab.tokenize(text.encode(), add_bos=False, special=False)
            assert count == len(ids) > 0
        async with http.post("/v1/completions", json=st_body()) as reply:
            assert reply.status == 200
            whole = st_extract_message(await reply.json())
        async with http.post("/v1/completions", json=st_body(stream=True)) as reply:
            streamed = st_parse_stream(await reply.read())
    assert whole
    assert streamed.error is None and streamed.done
    assert streamed.text == whole  # same seed, same text, streamed or not


async def test_abort_stops_the_stream_at_once(slow_bridge):
    body = st_body(stream=True, max_new_tokens=LONG_REPLY, max_tokens=LONG_REPLY, n_predict=LONG_REPLY,
                   ban_eos_token=True)
    async with aiohttp.ClientSession(slow_bridge.url) as http:
        rate = await decode_rate(http)
        began = time.monotonic()
        async with http.post("/v1/completions", json=body) as reply:
            await reply.content.readuntil(b"\n\n")  # the first token has arrived
            started = time.monotonic()
            async with http.post("/api/extra/abort") as abort:
                assert (await abort.json())["success"] == "true"
            rest = st_parse_stream(await reply.read())
            stopped_after = time.monotonic() - started
        assert rest.error is None
        assert stopped_after < 5.0  # the whole reply would take minutes
        finish = [e["choices"][0]["finish_reason"] for e in rest.events if e["choices"][0]["finish_reason"]]
        assert finish == ["stop"]
        await assert_next_request_is_not_held_back(http, rate, time.monotonic() - began)


async def test_native_generate_and_stream(bridge_server):
    body = {
        "prompt": "the dragon",
        "max_length": 12,
        "sampler_seed": 3,
        "rep_pen": 1.1,
        "temperature": 0.7,
        "sampler_order": [6, 0, 1, 3, 4, 2, 5],
        "stop_sequence": [],
    }
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.post("/api/v1/generate", json=body) as reply:
            whole = (await reply.json())["results"][0]["text"]
        async with http.post("/api/extra/generate/stream", json=body) as reply:
            raw = await reply.read()
    tokens = [line for line in raw.decode().split("\n\n") if line.startswith("event: message")]
    streamed = "".join(json.loads(t.split("data: ", 1)[1])["token"] for t in tokens)
    assert whole and streamed == whole


async def test_version_context_and_model(bridge_server):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.get("/api/extra/version") as reply:
            version = await reply.json()
        async with http.get("/api/extra/true_max_context_length") as reply:
            assert (await reply.json()) == {"value": 1024}
        async with http.get("/api/v1/model") as reply:
            assert (await reply.json())["result"] == "koboldcpp/tiny-llama-Q8_0"
        async with http.post("/api/extra/detokenize", json={"ids": [305, 306]}) as reply:
            assert (await reply.json())["success"] is True
    assert version["result"] == "KoboldCpp" and version["version"]
    assert "dry_multiplier" in version["samplers"]["honoured"] and "top_a" in version["samplers"]["ignored"]


async def test_custom_token_bans_and_logit_bias_object_are_obeyed(bridge_server, tiny_vocab):
    greedy = st_body(temperature=0, top_k=1, sampler_seed=1, seed=1)
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.post("/v1/completions", json=greedy) as reply:
            first = st_extract_message(await reply.json())
        ids = tiny_vocab.tokenize(first.encode(), add_bos=False, special=False)
        banned = sorted(set(ids[:3]))
        body = greedy | {
            "custom_token_bans": ",".join(map(str, banned[:2])),
            "logit_bias": {str(t): -100 for t in banned[2:]},
        }
        async with http.post("/v1/completions", json=body) as reply:
            second = st_extract_message(await reply.json())
    assert second != first
    assert not set(tiny_vocab.tokenize(second.encode(), add_bos=False, special=False)) & set(banned)


# --- translation details (stand-in engine) ----------------------------------------------------------


async def test_st_koboldcpp_body_translates(fake_bridge):
    client, engine = fake_bridge
    body = observed_bodies()["koboldcpp"] | {
        "logit_bias": {"15": 2.5, "16": -100},
        "custom_token_bans": "3, 4",
        "grammar": 'root ::= "yes"',
    }
    reply = await client.post("/v1/completions", json=body)
    assert reply.status == 200
    req = engine.requests[-1]
    sampling = req.sampling
    assert (req.prompt, req.max_tokens, req.stop) == ("Say hi\n", 350, ["\nUser:", "\n***"])
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repeat_penalty) == (
        0.5,
        0.9,
        0,
        1.1,
    )
    assert sampling.seed == -1
    assert sampling.dry_sequence_breakers == ["\n", ":", '"', "*"]
    assert sampling.logit_bias == {15: 2.5} and sampling.banned_tokens == [3, 4, 16]
    assert sampling.grammar == 'root ::= "yes"'
    # KoboldCpp's [6,0,1,3,4,2,5]: rep pen, top_k, (top_a), (tfs), typical, top_p, temperature
    assert sampling.order == [
        "penalties",
        "dry",
        "top_n_sigma",
        "top_k",
        "typical_p",
        "top_p",
        "min_p",
        "xtc",
        "temperature",
    ]


async def test_kobold_errors_use_one_envelope(fake_bridge):
    """(The queue's 503 in this envelope is tested on the real queue: test_server_robustness.py.)"""
    client, _ = fake_bridge
    reply = await client.post("/api/extra/tokencount", json={"prompt": ["not", "text"]})
    assert reply.status == 400 and "prompt" in (body := await reply.json())["error"]["message"]
    assert body["detail"]["msg"] == body["error"]["message"]


async def test_abort_reaches_the_engine(fake_bridge):
    client, engine = fake_bridge
    reply = await client.post("/api/extra/abort")
    assert reply.status == 200
    await asyncio.wait_for(engine.aborted.wait(), 1)
