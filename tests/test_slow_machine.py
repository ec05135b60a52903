"""Slow machines are not mistaken for hung ones (engine/progress.py, engine/client.py).

With the ~1B random model on this CPU one prompt batch takes seconds, which stands in for a 70B model's
batch on a laptop (minutes). The watchdog is set well below one batch: the request still completes,
because llama.cpp's per-node callback reports progress from inside the batch. A cancel during such a batch
lands within a fraction of it, without restarting the worker. A load that stops making progress (its
process frozen with SIGSTOP) is stopped after the load stall time and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from bridge.engine.client import Engine
from bridge.engine.progress import HEARTBEAT_S
from bridge.engine.types import GenerationRequest, GenerationResult, LoadSpec, SamplingParams
from bridge.errors import EngineError

# One batch of 1536 tokens on one thread: seconds on any CPU (about 10 s on the 2-core test machine), and
# each of its ~280 graph nodes well under the watchdog below.
BATCH = 1536


def spec(path: Path) -> LoadSpec:
    return LoadSpec(model_path=str(path), model_id=path.stem, n_ctx=4096, n_ubatch=BATCH, n_batch=BATCH,
                    n_threads=1)


def prompt(seed: int, n: int = BATCH) -> GenerationRequest:
    """`n` token ids no other prompt in this module shares a prefix with (nothing comes from the cache)."""
    draw = random.Random(seed)
    ids = [draw.randrange(3, 803) for _ in range(n)]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    return GenerationRequest(prompt=ids, max_tokens=2, sampling=greedy)


async def run(engine: Engine, req: GenerationRequest) -> GenerationResult:
    result = None
    async for item in engine.generate(req):
        if isinstance(item, GenerationResult):
            result = item
    assert result is not None
    return result


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def slow_engine(model_1b: Path) -> AsyncIterator[tuple[Engine, float]]:
    """The ~1B model loaded, and how long one of its prompt batches takes here (seconds)."""
    engine = Engine(max_queue=4)
    await engine.load(spec(model_1b))
    first = await run(engine, prompt(0))
    yield engine, first.timings.prompt_ms / 1000
    await engine.close()


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_a_batch_longer_than_the_watchdog_is_progress_not_a_hang(slow_engine) -> None:
    engine, batch_s = slow_engine
    stall = max(HEARTBEAT_S * 1.5, batch_s / 4)
    assert batch_s > 2 * stall, f"one batch ({batch_s:.1f} s) must outlast the watchdog ({stall:.1f} s) twice"
    pid = engine.worker_pid
    engine.hang_timeout_s = stall
    try:
        result = await run(engine, prompt(1))
    finally:
        engine.hang_timeout_s = 120.0
    assert result.stop_type == "limit", result.error
    assert result.timings.prompt_ms / 1000 > 2 * stall  # a silence this long used to read as a hang
    assert engine.worker_pid == pid


async def test_a_cancel_in_the_middle_of_a_prompt_batch_lands_without_a_reload(slow_engine) -> None:
    engine, batch_s = slow_engine
    pid = engine.worker_pid
    running = asyncio.ensure_future(run(engine, prompt(2)))
    await asyncio.sleep(min(1.0, batch_s / 3))  # well inside the first (and only) batch
    asked = time.monotonic()
    assert await engine.abort()
    result = await asyncio.wait_for(running, batch_s * 2)
    latency = time.monotonic() - asked
    assert result.stop_type == "abort" and result.tokens_predicted == 0
    assert latency < min(2.0, batch_s / 2), f"the cancel took {latency:.2f} s of a {batch_s:.1f} s batch"
    assert engine.worker_pid == pid, "the worker was restarted"
    after = await run(engine, prompt(3, 16))  # the cache is consistent: the next request runs normally
    assert after.stop_type == "limit" and engine.worker_pid == pid


async def test_a_load_that_makes_no_progress_is_stopped_and_reported(tiny_model: Path) -> None:
    events: list[tuple[str, dict]] = []
    engine = Engine(load_stall_s=2.0, on_event=lambda name, data: events.append((name, data)))
    before = {p.pid for p in psutil.Process().children()}
    loading = asyncio.ensure_future(engine.load(spec(tiny_model)))
    worker = await _new_child(before)
    worker.suspend()  # frozen mid-load: alive, silent
    started = time.monotonic()
    with pytest.raises(EngineError, match="no progress for 2 s"):
        await asyncio.wait_for(loading, 30)
    assert time.monotonic() - started < 10
    assert engine.status().state == "error" and "no progress" in (engine.status().error or "")
    assert any(name == "error" and "no progress" in data.get("message", "") for name, data in events)
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    await engine.close()


async def test_a_load_that_never_finishes_is_bounded(tiny_model: Path) -> None:
    engine = Engine(load_stall_s=60.0, load_timeout_s=1.0)
    before = {p.pid for p in psutil.Process().children()}
    loading = asyncio.ensure_future(engine.load(spec(tiny_model)))
    (await _new_child(before)).suspend()
    with pytest.raises(EngineError, match="had not finished after 1 s"):
        await asyncio.wait_for(loading, 30)
    await engine.close()


async def _new_child(before: set[int]) -> psutil.Process:
    """The engine worker the load just spawned (not the multiprocessing resource tracker), once it runs
    its own program: stopped between fork and exec it would hold the spawning thread, not the worker."""
    for _ in range(2000):
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                command = " ".join(child.cmdline())
                if child.pid not in before and "spawn_main" in command and "resource_tracker" not in command:
                    return child
        await asyncio.sleep(0.005)
    raise AssertionError("no worker process appeared")
