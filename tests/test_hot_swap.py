"""Live swaps on a real bridge with the tiny models: another model, another quant, another context, while ST
keeps talking to it. The running generation finishes (or is cancelled on request), requests that arrive
meanwhile wait and get the new model, `/v1/models`, `/health` and the management API answer throughout,
and the events say `loading` (with progress) then `ready`. A load that cannot work leaves the model that
was serving in place and says why."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tests.fixtures.server import BridgeServer, st_model_name, st_parse_stream

PROMPT = "<|im_start|>user\nTell me about the castle.<|im_end|>\n<|im_start|>assistant\n"
# Long enough that the stream is still running while the swap is asked for and a request queues behind it.
STREAM_TOKENS = 3000
EVENT_WAIT_S = 30.0


class Events:
    """`GET /bridge/v1/events` read in the background: every event, in order, as {"event", "data"}."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._arrived = asyncio.Condition()

    async def read(self, reply: aiohttp.ClientResponse) -> None:
        while True:
            block = (await reply.content.readuntil(b"\n\n")).decode()
            if block.startswith(":"):
                continue  # keep-alive
            fields = dict(line.split(": ", 1) for line in block.strip().splitlines())
            async with self._arrived:
                self.seen.append({"event": fields.get("event"), "data": json.loads(fields["data"])})
                self._arrived.notify_all()

    async def wait_for(self, name: str, after: int = 0, **match: Any) -> int:
        """The index of the first `name` event from index `after` on whose data has `match`."""

        def found() -> int | None:
            return next((i for i, e in enumerate(self.seen) if i >= after and e["event"] == name
                         and all(e["data"].get(k) == v for k, v in match.items())), None)

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: found() is not None), EVENT_WAIT_S)
        index = found()
        assert index is not None
        return index

    def names(self, start: int = 0) -> list[str]:
        return [e["event"] for e in self.seen[start:]]


@asynccontextmanager
async def watching(http: aiohttp.ClientSession) -> AsyncIterator[Events]:
    events = Events()
    reply = await http.get("/bridge/v1/events")
    reader = asyncio.create_task(events.read(reply))
    await events.wait_for("status")  # the snapshot
    try:
        yield events
    finally:
        reader.cancel()
        reply.close()


class Pollers:
    """ST's and the panel's status checks, asked every 50 ms for as long as the swap takes."""

    PATHS = ("/v1/models", "/health", "/bridge/v1/status")

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.replies: dict[str, list[tuple[int, Any, float]]] = {path: [] for path in self.PATHS}
        self._task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        while True:
            for path in self.PATHS:
                started = time.monotonic()
                async with self.http.get(path) as reply:
                    body = await reply.json()
                self.replies[path].append((reply.status, body, time.monotonic() - started))
            await asyncio.sleep(0.05)

    def __enter__(self) -> Pollers:
        self._task = asyncio.create_task(self._poll())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # a poll that raised (a refused connection, a reply that is not JSON)
        self._task.cancel()

    def check(self) -> None:
        """Every reply came, quickly: `/v1/models` always 200 with a `data` array (what ST needs to stay
        connected), `/health` ok or llama-server's 503 "Loading model", the status always 200."""
        models = self.replies["/v1/models"]
        assert len(models) >= 3, "the swap ended before the polls could see it"
        for status, body, _ in models:
            assert status == 200 and isinstance(body["data"], list), body
            st_model_name(body)
        for status, body, _ in self.replies["/health"]:
            assert status == 200 or (status == 503 and "Loading" in body["error"]["message"]), body
        assert all(status == 200 for status, _, _ in self.replies["/bridge/v1/status"])
        slowest = max(took for replies in self.replies.values() for _, _, took in replies)
        assert slowest < 2.0, f"a status check waited {slowest:.1f} s: it must never wait for a load"


def stream_body(n_predict: int = STREAM_TOKENS) -> dict[str, Any]:
    return {"prompt": PROMPT, "n_predict": n_predict, "ignore_eos": True, "temperature": 0, "stream": True}


async def load(http: aiohttp.ClientSession, **body: Any) -> tuple[int, dict[str, Any]]:
    async with http.post("/bridge/v1/load", json=body) as reply:
        return reply.status, await reply.json()


async def wait_queued(server: BridgeServer, http: aiohttp.ClientSession, length: int = 1) -> None:
    deadline = time.monotonic() + EVENT_WAIT_S
    while time.monotonic() < deadline:
        async with http.get("/bridge/v1/status") as reply:
            if (await reply.json())["queue_length"] >= length:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no request queued:\n{server.log()[-3000:]}")


async def complete(http: aiohttp.ClientSession) -> dict[str, Any]:
    """A short greedy reply (llama.cpp's `/completion`) to the stream's prompt. `tokens_cached` tells which
    worker served it: one that has just streamed this prompt reuses it, a freshly loaded one has nothing."""
    body = {"prompt": PROMPT, "n_predict": 8, "temperature": 0}
    async with http.post("/completion", json=body) as reply:
        assert reply.status == 200, await reply.text()
        return await reply.json()


def served_by_a_new_worker(answered: dict[str, Any], model: str) -> None:
    assert answered["model"] == model and answered["content"]
    assert answered["tokens_cached"] == 0, "a request queued during the swap ran on the old worker"


async def swap_during_a_stream(
    server: BridgeServer, **swap: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Events, int]:
    """Start a long stream, ask for `swap` while it runs, queue a request behind it; return (the stream's
    last event, the swap's reply, the queued request's reply, the events, the index where the swap began).
    """
    async with aiohttp.ClientSession(server.url) as http, watching(http) as events:
        start = len(events.seen)
        with Pollers(http) as pollers:
            stream = await http.post("/completion", json=stream_body())
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")  # the first token: it is running
            swapping = asyncio.create_task(load(http, **swap))
            began = await events.wait_for("load_started", start)
            queued = asyncio.create_task(complete(http))
            await wait_queued(server, http)
            assert not stream.content.at_eof(), "the stream ended before the swap began: make it longer"
            finished = st_parse_stream(await stream.read())
            status, swapped = await swapping
            assert status == 200, swapped
            answered = await queued
            await events.wait_for("ready", began)
        pollers.check()
    assert finished.error is None
    return finished.events[-1], swapped, answered, events, began


async def test_a_swap_during_a_stream_lets_it_finish_and_serves_the_queue_with_the_new_model(start_bridge):
    server = start_bridge("--model", "tiny-llama-Q8_0", "--ctx", "4096")
    last, swapped, answered, events, began = await swap_during_a_stream(server, model="tiny-llama-Q4_K_M")
    assert last["stop"] is True and last["stop_type"] == "limit"
    assert last["tokens_predicted"] == STREAM_TOKENS and last["model"] == "tiny-llama-Q8_0"  # the old model's
    assert swapped["model"] == "tiny-llama-Q4_K_M" and swapped["status"]["state"] == "ready"
    served_by_a_new_worker(answered, "tiny-llama-Q4_K_M")
    names = events.names(began)
    assert names.index("load_started") < names.index("loading") < names.index("ready")
    progress = [e["data"]["progress"] for e in events.seen[began:] if e["event"] == "loading"]
    assert progress[0] == 0.0 and all(0.0 <= p <= 1.0 for p in progress) and progress == sorted(progress)
    ready = events.seen[began + names.index("ready")]["data"]
    assert ready["model"] == "tiny-llama-Q4_K_M" and ready["quant"] == "Q4_K_M"
    assert ready["n_ctx"] == 4096 and isinstance(ready["gpu_layers"], int)
    for older_name in ("load_progress", "model_loaded", "status"):  # what the extension listens to
        await events.wait_for(older_name, began)  # the stream may deliver it just after the load's answer
    async with aiohttp.ClientSession(server.url) as http:
        async with http.get("/v1/models") as reply:
            assert st_model_name(await reply.json()) == "tiny-llama-Q4_K_M"
        again = await complete(http)  # the same request on a warm worker does reuse the prompt
        assert again["tokens_cached"] > 0 and again["content"] == answered["content"]


async def test_a_swap_can_cancel_the_running_generation(start_bridge):
    server = start_bridge("--model", "tiny-llama-Q8_0", "--ctx", "4096")
    async with aiohttp.ClientSession(server.url) as http:
        stream = await http.post("/completion", json=stream_body())
        await stream.content.readuntil(b"\n\n")
        status, swapped = await load(http, model="tiny-llama-Q6_K", cancel_running=True)
        finished = st_parse_stream(await stream.read())
    assert status == 200 and swapped["model"] == "tiny-llama-Q6_K"
    assert finished.events[-1]["stop_type"] == "abort"
    assert finished.events[-1]["tokens_predicted"] < STREAM_TOKENS


async def test_a_quant_switch_loads_the_sibling_file_and_keeps_the_context(start_bridge):
    server = start_bridge("--model", "tiny-llama-Q8_0", "--ctx", "4096")
    last, swapped, answered, events, began = await swap_during_a_stream(server, quant="q5_k_m")
    assert last["tokens_predicted"] == STREAM_TOKENS and last["model"] == "tiny-llama-Q8_0"
    assert swapped["model"] == "tiny-llama-Q5_K_M" and swapped["plan"]["n_ctx"] == 4096
    served_by_a_new_worker(answered, "tiny-llama-Q5_K_M")
    ready = events.seen[began + events.names(began).index("ready")]["data"]
    assert ready["quant"] == "Q5_K_M"
    async with aiohttp.ClientSession(server.url) as http:
        status, body = await load(http, quant="IQ2_XS")
        assert status == 404 and "Q4_K_M" in body["error"]["message"]  # says which quants there are


async def test_a_context_change_reloads_the_same_file(start_bridge):
    server = start_bridge("--model", "tiny-llama-Q6_K", "--ctx", "4096")
    last, swapped, answered, _, _ = await swap_during_a_stream(server, ctx=2048)
    assert last["tokens_predicted"] == STREAM_TOKENS
    assert swapped["model"] == "tiny-llama-Q6_K" and swapped["plan"]["n_ctx"] == 2048
    served_by_a_new_worker(answered, "tiny-llama-Q6_K")
    async with aiohttp.ClientSession(server.url) as http:
        async with http.get("/props") as reply:
            assert (await reply.json())["default_generation_settings"]["n_ctx"] == 2048
        async with http.get("/api/extra/true_max_context_length") as reply:
            assert (await reply.json())["value"] == 2048


async def test_a_failed_load_leaves_the_previous_model_serving_and_says_why(
    start_bridge, tmp_path, models_dir
):
    own = tmp_path / "models"
    own.mkdir()
    good = (models_dir / "tiny-llama-Q8_0.gguf").read_bytes()
    (own / "tiny-llama-Q8_0.gguf").write_bytes(good)
    (own / "cut-short.gguf").write_bytes(good[: len(good) * 2 // 3])  # an interrupted download
    # A header llama.cpp rejects only when it loads the weights: a tensor it needs is missing.
    broken = _rename_tensor(good, b"output_norm.weight", b"output_norx.weight")
    (own / "missing-tensor.gguf").write_bytes(broken)
    server = start_bridge("--model", "tiny-llama-Q8_0", "--ctx", "1024", models=own)
    failures = {
        "cut-short": ({"model": "cut-short"}, 422, "truncated"),
        "too big": ({"ctx": 1 << 24}, 507, "does not fit"),  # the largest context a request may ask
        "missing-tensor": ({"model": "missing-tensor"}, 502, "output_norm"),
    }
    async with aiohttp.ClientSession(server.url) as http, watching(http) as events:
        for name, (body, http_status, reason) in failures.items():
            start = len(events.seen)
            status, reply = await load(http, **body)
            assert status == http_status and reason in reply["error"]["message"], (name, reply)
            error = await events.wait_for("error", start)
            assert reason in events.seen[error]["data"]["message"], name
            assert server.status()["state"] == "ready" and server.status()["model"] == "tiny-llama-Q8_0"
            assert (await complete(http))["model"] == "tiny-llama-Q8_0"
            async with http.get("/v1/models") as models:
                assert st_model_name(await models.json()) == "tiny-llama-Q8_0"
        assert "could not load missing-tensor" in server.status()["error"]  # still says why


def _rename_tensor(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) == 1
    return data.replace(old, new)



async def test_a_request_sent_while_the_model_loads_waits_and_is_served(start_bridge, tmp_path, model_1b):
    """ST keeps chatting while the bridge is in the `loading` state: the request is held, not refused."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "slow-1b-Q4_K_M.gguf").symlink_to(model_1b)
    server = start_bridge(models=models, wait=("empty",))
    body = {"prompt": PROMPT, "n_predict": 4, "seed": 1}
    async with aiohttp.ClientSession(server.url) as http:
        load = asyncio.ensure_future(http.post("/bridge/v1/load", json={"model": "slow-1b-Q4_K_M"}))
        deadline = time.monotonic() + 30
        while server.status()["state"] != "loading":
            assert time.monotonic() < deadline and not load.done(), "the load never showed as loading"
            await asyncio.sleep(0.01)
        async with http.post("/completion", json=body) as reply:
            assert reply.status == 200, await reply.text()
            assert (await reply.json())["tokens_predicted"] > 0
        assert (await load).status == 200


async def test_a_request_queued_before_the_swap_names_the_model_that_served_it(start_bridge):
    server = start_bridge("--model", "tiny-llama-Q8_0", "--ctx", "4096")
    async with aiohttp.ClientSession(server.url) as http:
        stream = await http.post("/completion", json=stream_body())
        await stream.content.readuntil(b"\n\n")
        queued = asyncio.create_task(complete(http))  # asked while Q8_0 is the model
        await wait_queued(server, http)
        status, _ = await load(http, model="tiny-llama-Q4_K_M")
        assert status == 200
        finished = st_parse_stream(await stream.read())
        answered = await queued
    assert finished.events[-1]["model"] == "tiny-llama-Q8_0"
    served_by_a_new_worker(answered, "tiny-llama-Q4_K_M")  # the swap went first; the name follows it
