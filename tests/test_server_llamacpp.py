"""ST's llamacpp type against a real bridge: status, `/tokenize`, `/completion` streamed and not, disconnect;
`/props`, `/health`, `/slots`; the samplers ST users tune, obeyed; and llama.cpp's field shapes."""

from __future__ import annotations

import asyncio
import contextlib
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

TEXTS = ["Say hi", "*smiles softly* hello there", "User: tell me a story\nAssistant:"]


def st_body(**changes: object) -> dict:
    """The body ST 1.12.6 sent for llamacpp, shortened for speed, with a fixed seed unless changed."""
    return observed_st_body("llamacpp", **({"seed": 11, "sampler_seed": 11} | changes))


async def complete(http: aiohttp.ClientSession, **changes: object) -> str:
    async with http.post("/completion", json=st_body(**changes)) as reply:
        assert reply.status == 200, await reply.text()
        return st_extract_message(await reply.json())


async def test_st_sequence_llamacpp(bridge_server, tiny_vocab):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.get("/v1/models") as reply:
            assert st_model_name(await reply.json()) == "tiny-llama-Q8_0"
        for text in TEXTS:
            async with http.post("/tokenize", json={"content": text}) as reply:
                count, ids = st_token_count(await reply.json())
            assert ids == tiny_vocab.tokenize(text.encode(), add_bos=False, special=False) and count == len(
                ids
            )
        async with http.post("/completion", json=st_body()) as reply:
            data = await reply.json()
        async with http.post("/completion", json=st_body(stream=True)) as reply:
            streamed = st_parse_stream(await reply.read())
    assert data["stop"] is True and data["stop_type"] in ("eos", "limit", "word")
    assert data["tokens_predicted"] > 0 and data["tokens_evaluated"] > 0
    assert streamed.error is None and streamed.events[-1]["stop"] is True
    assert streamed.text == st_extract_message(data)


async def test_disconnect_stops_generation_and_frees_the_engine(slow_bridge):
    body = st_body(stream=True, n_predict=LONG_REPLY, max_tokens=LONG_REPLY, max_new_tokens=LONG_REPLY,
                   ignore_eos=True)
    async with aiohttp.ClientSession(slow_bridge.url) as http:
        rate = await decode_rate(http)
        started = time.monotonic()
        reply = await http.post("/completion", json=body)
        await reply.content.readuntil(b"\n\n")
        reply.close()  # what ST does: abort the fetch, closing the connection
        await assert_next_request_is_not_held_back(http, rate, time.monotonic() - started)
    assert slow_bridge.status()["queue_length"] == 0


async def test_disconnect_during_a_whole_reply_stops_it(slow_bridge):
    body = st_body(n_predict=LONG_REPLY, max_tokens=LONG_REPLY, max_new_tokens=LONG_REPLY,
                   ignore_eos=True)  # not streamed
    async with aiohttp.ClientSession(slow_bridge.url) as http:
        rate = await decode_rate(http)
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await http.post("/completion", json=body, timeout=aiohttp.ClientTimeout(total=1))
        await assert_next_request_is_not_held_back(http, rate, time.monotonic() - started)
    assert slow_bridge.status()["queue_length"] == 0


async def test_props_health_slots_detokenize(bridge_server, tiny_vocab):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.get("/props") as reply:
            props = await reply.json()
        async with http.get("/health") as reply:
            assert reply.status == 200 and (await reply.json())["status"] == "ok"
        async with http.get("/slots") as reply:
            assert (await reply.json())[0]["n_ctx"] == 1024
        ids = tiny_vocab.tokenize(b"the castle at night", add_bos=False, special=False)
        async with http.post("/detokenize", json={"tokens": ids}) as reply:
            assert (await reply.json())["content"].strip() == "the castle at night"
    assert props["default_generation_settings"]["n_ctx"] == 1024
    assert "<|im_start|>" in props["chat_template"]
    assert "min_p" in props["samplers"]


async def test_fixed_seed_repeats_and_another_seed_differs(bridge_server):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        first = await complete(http, temperature=1.5, seed=5)
        again = await complete(http, temperature=1.5, seed=5)
        other = await complete(http, temperature=1.5, seed=6)
    assert first == again
    assert other != first


async def test_stop_strings_stop_and_never_appear(bridge_server):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        free = await complete(http, temperature=0, top_k=1, stop=[], stopping_strings=[])
        stop = free[len(free) // 2 : len(free) // 2 + 3]
        cut = await complete(http, temperature=0, top_k=1, stop=[stop], stopping_strings=[stop])
        async with http.post(
            "/completion", json=st_body(temperature=0, top_k=1, stop=[stop], stream=True)
        ) as reply:
            streamed = st_parse_stream(await reply.read())
    assert stop and stop not in cut
    assert cut == free[: free.index(stop)]
    assert streamed.text == cut and streamed.events[-1]["stop_type"] == "word"


async def test_grammar_allows_only_yes_or_no(bridge_server):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        answers = {
            await complete(http, grammar='root ::= "yes" | "no"', seed=s, temperature=2.0) for s in range(4)
        }
    assert answers <= {"yes", "no"} and answers


async def test_logit_bias_pairs_remove_tokens(bridge_server, tiny_vocab):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        free = await complete(http, temperature=0, top_k=1)
        ids = tiny_vocab.tokenize(free.encode(), add_bos=False, special=False)
        banned = sorted(set(ids[:2]))
        biased = await complete(
            http, temperature=0, top_k=1, logit_bias=[[banned[0], -100], [banned[-1], False]]
        )
    assert biased != free
    assert not set(tiny_vocab.tokenize(biased.encode(), add_bos=False, special=False)) & set(banned)


async def test_probabilities_in_both_llamacpp_formats(bridge_server):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.post("/completion", json=st_body(n_probs=3, n_predict=4)) as reply:
            data = await reply.json()
        async with http.post("/completion", json=st_body(n_probs=3, n_predict=4, stream=True)) as reply:
            streamed = st_parse_stream(await reply.read())
    first = data["completion_probabilities"][0]
    assert len(first["probs"]) == 3 and 0 < first["probs"][0]["prob"] <= 1  # ST 1.12: {tok_str, prob}
    assert first["top_logprobs"][0]["logprob"] <= 0  # newer ST and llama.cpp: {token, logprob}
    assert all("completion_probabilities" in e for e in streamed.events[:-1])


# --- translation details (stand-in engine) ----------------------------------------------------------


async def test_st_llamacpp_body_translates(fake_bridge):
    client, engine = fake_bridge
    body = observed_bodies()["llamacpp"] | {
        "logit_bias": [[15, 1.5], [16, False], ["ab", -100]],
        "dry_sequence_breakers": ["\n", "*"],
        "seed": 42,
        "n_predict": -1,
        "max_tokens": -1,
        "max_new_tokens": -1,
        "samplers": ["dry", "top_k", "tfs_z", "min_p", "temperature"],
    }
    reply = await client.post("/completion", json=body)
    assert reply.status == 200
    sampling = engine.requests[-1].sampling
    assert sampling.logit_bias == {15: 1.5}
    assert sampling.banned_tokens == [16, ord("a"), ord("b")]  # "ab" tokenized by the engine, then banned
    assert sampling.dry_sequence_breakers == ["\n", "*"] and sampling.seed == 42
    assert engine.requests[-1].max_tokens == 2048  # n_predict -1: until the context is full
    assert sampling.order[:4] == ["penalties", "dry", "top_n_sigma", "top_k"]
    assert sampling.order.index("min_p") < sampling.order.index("xtc") < sampling.order.index("temperature")


async def test_bad_fields_get_a_llamacpp_error(fake_bridge):
    client, _ = fake_bridge
    reply = await client.post("/completion", json={"prompt": "x", "logit_bias": [[1, "lots"]]})
    body = await reply.json()
    assert reply.status == 400 and body["error"]["code"] == 400 and "logit_bias" in body["error"]["message"]
    reply = await client.post("/completion", data=b"{not json", headers={"Content-Type": "application/json"})
    assert reply.status == 400


async def test_tokenize_never_waits_behind_a_generation(slow_bridge):
    body = st_body(stream=True, n_predict=2000, max_tokens=2000, max_new_tokens=2000, ignore_eos=True)
    async with aiohttp.ClientSession(slow_bridge.url) as http:
        async with http.post("/completion", json=body) as reply:
            await reply.content.readuntil(b"\n\n")
            started = time.monotonic()
            for _ in range(10):
                async with http.post("/tokenize", json={"content": "the moon and the stars"}) as tokens:
                    assert (await tokens.json())["tokens"]
            elapsed = time.monotonic() - started
            reply.close()
        await asyncio.sleep(0.1)
    assert elapsed < 1.0
