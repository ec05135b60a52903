"""A real bridge under pressure: concurrent clients, a full queue, and the worker killed mid-stream."""

from __future__ import annotations

import asyncio

import aiohttp
import psutil

from bridge.engine.client import RETRY_AFTER_S
from tests.fixtures.server import st_extract_message, st_parse_stream

PROMPTS = [
    f"{word} the story of the {thing}"
    for word in ("tell", "write", "say", "find", "make")
    for thing in ("dragon", "knight", "castle", "moon")
]  # 20 different prompts


def greedy(prompt: str, **changes: object) -> dict:
    return {"prompt": prompt, "n_predict": 8, "temperature": 0, "top_k": 1, "seed": 1} | changes


async def test_twenty_requests_from_four_clients_all_complete_unmixed(bridge_server):
    async with aiohttp.ClientSession(bridge_server.url) as http:
        alone = {}
        for prompt in PROMPTS:
            async with http.post("/completion", json=greedy(prompt)) as reply:
                alone[prompt] = st_extract_message(await reply.json())

    async def client(prompts: list[str]) -> dict[str, str]:
        answers = {}
        async with aiohttp.ClientSession(bridge_server.url) as http:
            for prompt in prompts:
                async with http.post("/completion", json=greedy(prompt, stream=True)) as reply:
                    assert reply.status == 200
                    answers[prompt] = st_parse_stream(await reply.read()).text
        return answers

    results = await asyncio.gather(*(client(PROMPTS[i::4]) for i in range(4)))
    together = {prompt: text for answers in results for prompt, text in answers.items()}
    assert len(together) == 20
    assert together == alone  # each reply is its own prompt's, with no tokens of another mixed in


async def test_past_the_queue_bound_503_with_retry_after(start_bridge, model_1b):
    """The real queue's bound, in every dialect ST uses, with the envelope each one reads."""
    server = start_bridge("--model", str(model_1b), "--ctx", "512", "--max-queue", "1")
    long = greedy("the long night", n_predict=500, ignore_eos=True, stream=True)
    async with aiohttp.ClientSession(server.url) as http:
        running = await http.post("/completion", json=long)
        await running.content.readuntil(b"\n\n")  # the first one runs
        waiting = asyncio.create_task(http.post("/completion", json=greedy("the queue")))
        for _ in range(100):
            if server.status()["queue_length"] == 1:
                break
            await asyncio.sleep(0.05)
        assert server.status()["queue_length"] == 1
        for path, body in [("/completion", greedy("one too many")),
                           ("/v1/completions", {"prompt": "one too many", "max_tokens": 2}),
                           ("/api/v1/generate", {"prompt": "one too many", "max_length": 2})]:
            async with http.post(path, json=body) as refused:
                assert refused.status == 503, path
                assert refused.headers["Retry-After"] == str(RETRY_AFTER_S), path
                error = await refused.json()
                assert "waiting" in error["error"]["message"], path
                if path == "/api/v1/generate":  # KoboldAI's own shape, which ST's koboldcpp type reads
                    assert error["detail"]["msg"] == error["error"]["message"]
        running.close()
        queued = await waiting
        assert queued.status == 200 and st_extract_message(await queued.json())
        queued.close()


async def test_worker_killed_mid_stream(slow_bridge):
    server = slow_bridge
    long = greedy("the long night", n_predict=2000, ignore_eos=True, stream=True)
    async with aiohttp.ClientSession(server.url) as http:
        async with http.post("/completion", json=long) as reply:
            await reply.content.readuntil(b"\n\n")
            workers = psutil.Process(server.process.pid).children(recursive=True)
            assert workers, "the engine runs in a child process"
            for worker in workers:
                worker.kill()  # SIGKILL; TerminateProcess on Windows
            stream = st_parse_stream(await reply.read())
        assert stream.error and "generation failed" in stream.error  # ST shows this as a toast
        async with http.get("/v1/models") as models:
            assert models.status == 200  # the server answers throughout
        server.wait_for(("ready",), timeout=60)
        async with http.post("/completion", json=greedy("after the crash", n_predict=2)) as reply:
            assert reply.status == 200 and st_extract_message(await reply.json())
