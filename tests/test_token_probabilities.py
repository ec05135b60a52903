"""ST's token-probability viewer on all three dialects, and rerolls from an alternative token served from
the cache.

Each streamed chunk is read as SillyTavern 1.19 reads it (textgen-settings.js, parseTextgenLogprobs: the
koboldcpp and ooba types take `choices[0].logprobs.top_logprobs[0]` as {token: logprob}, llama.cpp takes
`completion_probabilities[0]`, `probs` or `top_logprobs`). Clicking an alternative in the viewer makes ST
continue the reply from the text before that token plus the alternative (logprobs.js,
onAlternativeClicked): the prompt is the old one plus part of the reply, all of it in the cache but the new
tail.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import aiohttp
import pytest

from tests.fixtures.server import st_body

PROMPT = ("<|im_start|>system\nYou are Seraphina, a guardian of the forest.<|im_end|>\n<|im_start|>user\n"
          "Tell me about the castle and the dragon.<|im_end|>\n<|im_start|>assistant\n")
ROUTES = {"koboldcpp": "/v1/completions", "ooba": "/v1/completions", "llamacpp": "/completion"}


def st_logprobs(api_type: str, data: dict[str, Any]) -> list[tuple[str, float]] | None:
    """parseTextgenLogprobs: the candidates ST shows for one streamed chunk (probabilities 0..1)."""
    if api_type in ("koboldcpp", "ooba"):
        top = ((data.get("choices") or [{}])[0].get("logprobs") or {}).get("top_logprobs")
        return [(t, math.exp(lp)) for t, lp in top[0].items()] if top else None
    items = data.get("completion_probabilities")
    if not items:
        return None
    if items[0].get("probs"):
        return [(p["tok_str"], p["prob"]) for p in items[0]["probs"]]
    return [(p["token"], math.exp(p["logprob"])) for p in items[0]["top_logprobs"]]


def chunks(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for event in re.split(r"\r\n\r\n|\n\n", raw.decode()):
        lines = [line[5:].strip() for line in event.splitlines() if line.startswith("data:")]
        if lines and lines[0] != "[DONE]":
            out.append(json.loads("\n".join(lines)))
    return out


def _whole(text: str) -> bool:
    return bool(text) and text.isascii() and text.isprintable()


def text_of(data: dict[str, Any]) -> str:
    return (data.get("choices") or [{}])[0].get("text") or data.get("content") or ""


@pytest.mark.parametrize("api_type", ["koboldcpp", "ooba", "llamacpp"])
async def test_the_viewer_gets_candidates_for_every_token(bridge_server, api_type: str) -> None:
    body = st_body(api_type, 12, prompt=PROMPT, stream=True, logprobs=5, n_probs=5, ignore_eos=True,
                   ban_eos_token=True)
    async with (aiohttp.ClientSession(bridge_server.url) as http,
                http.post(ROUTES[api_type], json=body) as reply):
        assert reply.status == 200
        events = chunks(await reply.read())
    tokens = [e for e in events if text_of(e)]
    assert len(tokens) >= 10
    for event in tokens:
        candidates = st_logprobs(api_type, event)
        # The {token: logprob} map of the OpenAI shape holds one entry per text: two candidates that spell
        # the same (byte tokens of one character) share it.
        assert candidates and (len(candidates) == 5 if api_type == "llamacpp" else 1 <= len(candidates) <= 5)
        assert all(0 < p <= 1 for _, p in candidates)
        assert sorted((p for _, p in candidates), reverse=True) == [p for _, p in candidates]


async def test_an_alternative_token_is_continued_from_the_cache(bridge_server) -> None:
    """The reroll evaluates only the new tokens: the prompt and the kept part of the reply are cached."""
    first = st_body("llamacpp", 24, prompt=PROMPT, n_probs=5, ignore_eos=True, stream=False, seed=3)
    async with aiohttp.ClientSession(bridge_server.url) as http:
        async with http.post("/completion", json=first) as reply:
            answer = await reply.json()
        probs = answer["completion_probabilities"]
        # The user clicks an alternative for a token past the first few; one whose text and alternative are
        # whole characters (the tiny model's byte tokens can split a character, and ST shows those as "?").
        cut, alternative = next((i, alt) for i in range(6, len(probs)) if _whole(probs[i]["content"])
                                for alt in (p["tok_str"] for p in probs[i]["probs"])
                                if alt != probs[i]["content"] and _whole(alt))
        kept = "".join(p["content"] for p in probs[:cut])
        # The user reads the candidates before clicking one; meanwhile the worker re-spells the reply as the
        # tokenizer will spell it in ST's next prompt (Runner.settle: random weights rarely generate the
        # tokenizer's spelling), so the kept text is found in the cache.
        await asyncio.sleep(1.0)
        again = st_body("llamacpp", 8, prompt=PROMPT + kept + alternative, ignore_eos=True, stream=False,
                        seed=3)
        async with http.post("/completion", json=again) as reply:
            rerolled = await reply.json()
        async with http.post("/tokenize", json={"content": alternative}) as reply:
            alternative_tokens = len((await reply.json())["tokens"])
    assert rerolled["tokens_evaluated"] > 40
    # Only the alternative (and at most a token of the kept text whose spelling joins with it) is new.
    assert rerolled["timings"]["prompt_n"] <= alternative_tokens + 2, rerolled["timings"]
    assert rerolled["tokens_cached"] >= rerolled["tokens_evaluated"] - alternative_tokens - 2
