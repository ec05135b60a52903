"""The engine handle: loading, exact tokenization, the FIFO queue, cancellation and crash recovery.

Everything runs the real worker process with the tiny model; crashes and hangs are real: the process
is killed (SIGKILL; TerminateProcess on Windows) or suspended (SIGSTOP), through psutil on every platform.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from bridge.engine.client import MAX_CRASHES_IN_WINDOW, Engine
from bridge.engine.types import GenerationRequest, GenerationResult, LoadSpec, SamplingParams, TokenChunk
from bridge.errors import Busy, EngineError

PROMPT = "<|im_start|>user\nHello there, knight.<|im_end|>\n<|im_start|>assistant\n"


def spec(path: Path, **extra: object) -> LoadSpec:
    return LoadSpec(model_path=str(path), model_id=path.stem, n_ctx=4096, n_threads=1, **extra)  # type: ignore[arg-type]


def long_request(max_tokens: int = 4000) -> GenerationRequest:
    """A request that would run for seconds: only a stop or an error ends it early."""
    return GenerationRequest(prompt=PROMPT, max_tokens=max_tokens,
                             sampling=SamplingParams(temperature=1.0, seed=1, ignore_eos=True))


def short_request(max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, max_tokens=max_tokens,
                             sampling=SamplingParams(temperature=0.0, ignore_eos=True))


async def collect(engine: Engine, req: GenerationRequest) -> GenerationResult:
    items = [item async for item in engine.generate(req)]
    assert isinstance(items[-1], GenerationResult)
    assert all(isinstance(i, TokenChunk) for i in items[:-1])
    return items[-1]


@pytest_asyncio.fixture
async def engine(tiny_model: Path) -> AsyncIterator[Engine]:
    engine = Engine(max_queue=2, hang_timeout_s=3.0)
    await engine.load(spec(tiny_model))
    yield engine
    await engine.close()


# ---- loading ---------------------------------------------------------------------------------------------

async def test_load_reports_progress_then_ready(tiny_model: Path) -> None:
    events: list[tuple[str, dict]] = []
    engine = Engine(on_event=lambda name, data: events.append((name, data)))
    try:
        assert engine.status().state == "empty"
        status = await engine.load(spec(tiny_model))
        assert status.state == "ready" and status.n_ctx == 4096 and status.model_id == tiny_model.stem
        assert "<|im_start|>" in status.chat_template
        names = [name for name, _ in events]
        assert names[0] == "loading" and names[-1] == "ready"
        progress = [data["progress"] for name, data in events if name == "loading"]
        assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)
    finally:
        await engine.close()
    assert engine.status().state == "empty"


async def test_a_corrupt_file_fails_with_a_clear_error(tmp_path: Path, tiny_model: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a model" * 100)
    engine = Engine()
    try:
        with pytest.raises(EngineError, match="garbage"):
            await engine.load(spec(garbage))
        assert (await engine.load(spec(tiny_model))).state == "ready"  # this process lives on, and loads
    finally:
        await engine.close()


async def test_a_truncated_model_fails_with_llama_cpps_reason_and_the_previous_model_stays(
        engine: Engine, tmp_path: Path, tiny_model: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    with pytest.raises(EngineError, match=r"cannot load truncated\.gguf: .*not within the file bounds"):
        await engine.load(spec(truncated))
    status = engine.status()
    assert status.state == "ready" and status.model_id == tiny_model.stem
    assert (await collect(engine, short_request())).tokens_predicted == 8


async def test_a_load_failing_in_the_worker_brings_the_previous_model_back(
        engine: Engine, tiny_models: dict[str, Path]) -> None:
    # A quantized V cache needs flash attention: llama.cpp refuses the context inside the worker.
    impossible = spec(tiny_models["Q4_K_M"], kv_type="q4_0", flash_attn=False)
    with pytest.raises(EngineError, match=r"could not load .*context"):
        await engine.load(impossible)
    status = engine.status()
    assert status.state == "ready" and status.model_id == tiny_models["Q8_0"].stem
    assert "could not load" in (status.error or "")  # and it still says why the swap failed
    assert (await collect(engine, short_request())).tokens_predicted == 8


# ---- tokens ----------------------------------------------------------------------------------------------

TEXTS = [PROMPT, "Hello world", "the dragon", "", "<|im_start|>system\nA knight.<|im_end|>\n"]


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
async def test_token_counts_are_what_the_worker_evaluates(bos: bool, tiny_model: Path,
                                                          tiny_model_no_bos: Path) -> None:
    """With and without a BOS in the vocabulary's wishes (the no-BOS one asks for an EOS instead, which
    llama.cpp's own add-special flag would append)."""
    engine = Engine()
    try:
        await engine.load(spec(tiny_model if bos else tiny_model_no_bos))
        for text in TEXTS[:4]:
            ids = engine.tokenize(text, add_bos=True)
            assert (ids[:1] == [1]) is bos and 2 not in ids, (text, ids)  # BOS is 1 and EOS 2 in both
            req = GenerationRequest(prompt=text, max_tokens=1, sampling=SamplingParams(temperature=0.0))
            result = await collect(engine, req)
            assert result.tokens_evaluated == max(len(ids), 1), text  # an empty prompt evaluates one token
    finally:
        await engine.close()


async def test_tokenize_round_trips_and_merges(engine: Engine) -> None:
    assert engine.detokenize(engine.tokenize("Hello world")) == "Hello world"
    assert len(engine.tokenize("the dragon")) < len("the dragon")  # merges, not bytes
    start, end = engine.tokenize("<|im_start|>"), engine.tokenize("<|im_end|>")  # specials: one token each
    assert len(start) == len(end) == 1 and set(start + end) <= set(engine.tokenize(TEXTS[4]))


async def test_token_counts_do_not_wait_behind_a_generation(engine: Engine) -> None:
    """While a long reply streams, a count is answered within one decode step (it is never queued)."""
    timings = (await collect(engine, short_request(64))).timings
    step = timings.predicted_ms / 1000 / timings.predicted_n  # one decode step of this model, here, now
    text = PROMPT * 8  # a chat's worth of text
    counting: list[float] = []
    stream = engine.generate(long_request())
    async for item in stream:
        assert isinstance(item, TokenChunk)
        started = time.perf_counter()
        assert engine.tokenize(text, add_bos=True)
        counting.append(time.perf_counter() - started)
        if len(counting) == 25:
            break
    await stream.aclose()
    assert statistics.median(counting) < step, (counting, step)


async def test_without_a_model_tokenize_and_generate_say_so() -> None:
    engine = Engine()
    with pytest.raises(EngineError, match="no model is loaded"):
        engine.tokenize("hi")
    with pytest.raises(EngineError, match="no model is loaded"):
        await collect(engine, short_request())
    await engine.close()


async def test_unload_frees_the_model(engine: Engine) -> None:
    pid = engine.worker_pid
    await engine.unload()
    assert engine.status().state == "empty" and engine.worker_pid is None
    with pytest.raises(EngineError):
        engine.tokenize("hi")
    assert pid is not None and not _alive(pid)


# ---- queue and cancellation ------------------------------------------------------------------------------

async def test_abort_stops_the_generation_and_the_next_starts_at_once(engine: Engine) -> None:
    stream = engine.generate(long_request())
    chunks = 0
    async for item in stream:
        if isinstance(item, GenerationResult):
            result = item
            break
        chunks += 1
        if chunks == 5:
            assert await engine.abort()
    assert result.stop_type == "abort" and result.tokens_predicted < 100
    assert (await asyncio.wait_for(collect(engine, short_request()), 10)).tokens_predicted == 8
    assert not await engine.abort()  # nothing running now


async def test_a_consumer_that_leaves_stops_the_generation(engine: Engine) -> None:
    stream = engine.generate(long_request())
    for _ in range(3):
        await anext(stream)
    await stream.aclose()
    # The worker stops within a token, so the next request does not wait ~4000 tokens.
    result = await asyncio.wait_for(collect(engine, short_request()), 10)
    assert result.stop_type == "limit" and result.tokens_predicted == 8


async def test_a_cancelled_task_stops_its_generation(engine: Engine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(long_request()):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await asyncio.wait_for(collect(engine, short_request()), 10)).tokens_predicted == 8


async def test_requests_run_one_at_a_time_in_order_and_busy_past_the_bound(engine: Engine) -> None:
    order: list[str] = []

    async def client(name: str, req: GenerationRequest) -> GenerationResult:
        result = await collect(engine, req)
        order.append(name)
        return result

    running = engine.generate(long_request())
    await anext(running)
    waiting = [asyncio.create_task(client(name, short_request())) for name in ("first", "second")]
    while engine.status().queue_length < 2:
        await asyncio.sleep(0.01)
    with pytest.raises(Busy) as busy:
        engine.generate(short_request())
    assert busy.value.retry_after_s > 0
    await engine.abort()
    async for _ in running:
        pass
    results = await asyncio.gather(*waiting)
    assert order == ["first", "second"]
    assert [r.text for r in results] == [results[0].text] * 2  # same greedy request, same answer, untangled


async def test_a_queue_of_zero_serves_one_at_a_time_and_refuses_the_waiting(tiny_model: Path) -> None:
    engine = Engine(max_queue=0)
    try:
        await engine.load(spec(tiny_model))
        assert (await collect(engine, short_request())).tokens_predicted == 8  # idle: served
        running = engine.generate(long_request())
        await anext(running)
        with pytest.raises(Busy):
            engine.generate(short_request())  # it would have to wait, and no one may
        await running.aclose()  # the turn passes on once the worker has confirmed the stop
        await _wait_until(lambda: engine.status().state == "ready" and _accepts(engine))
        assert (await collect(engine, short_request())).tokens_predicted == 8
    finally:
        await engine.close()


def _accepts(engine: Engine) -> bool:
    try:
        engine.generate(short_request())  # not iterated: only the queue check runs
    except Busy:
        return False
    return True


# ---- crashes ---------------------------------------------------------------------------------------------

async def test_a_killed_worker_ends_the_request_with_an_error_and_is_restarted(engine: Engine) -> None:
    first_pid = engine.worker_pid
    assert first_pid is not None
    result = None
    chunks = 0
    async for item in engine.generate(long_request()):
        if isinstance(item, GenerationResult):
            result = item
        else:
            chunks += 1
            if chunks == 3:
                psutil.Process(first_pid).kill()
    assert result is not None and result.stop_type == "error"
    if sys.platform != "win32":  # Windows has no signals to name
        assert result.error and "killed by SIGKILL" in result.error
    after = await asyncio.wait_for(collect(engine, short_request()), 30)
    assert after.stop_type == "limit" and after.tokens_predicted == 8
    assert engine.worker_pid not in (None, first_pid)
    assert engine.status().state == "ready"


async def test_a_hung_worker_is_detected_killed_and_restarted(engine: Engine) -> None:
    pid = engine.worker_pid
    assert pid is not None
    stream = engine.generate(long_request())
    await anext(stream)
    psutil.Process(pid).suspend()  # frozen: no token, no exit
    result = None
    async for item in stream:
        if isinstance(item, GenerationResult):
            result = item
    assert result is not None and result.stop_type == "error" and "hung" in (result.error or "")
    after = await asyncio.wait_for(collect(engine, short_request()), 30)
    assert after.tokens_predicted == 8 and engine.worker_pid != pid
    assert not _alive(pid)


async def test_a_worker_that_keeps_crashing_is_restarted_three_times_a_minute_then_left_down(
        engine: Engine) -> None:
    for restart in range(MAX_CRASHES_IN_WINDOW + 1):
        pid = engine.worker_pid
        assert pid is not None and engine.status().state == "ready", restart
        psutil.Process(pid).kill()
        await _wait_until(lambda pid=pid: engine.worker_pid != pid or engine.status().state == "error")
        if restart < MAX_CRASHES_IN_WINDOW:
            await _wait_until(lambda: engine.status().state == "ready")
    status = engine.status()
    assert status.state == "error" and "crashed 4 times in a minute" in (status.error or "")
    assert engine.worker_pid is None
    with pytest.raises(EngineError):
        await collect(engine, short_request())


async def _wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


async def test_close_stops_the_worker(tiny_model: Path) -> None:
    engine = Engine()
    await engine.load(spec(tiny_model))
    pid = engine.worker_pid
    await engine.close()
    assert pid is not None and not _alive(pid)


def _alive(pid: int) -> bool:
    # A zombie still exists; it is gone for our purposes once it no longer runs.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_worker_computes_on_a_threadpool_of_its_own_as_llama_server_does(tiny_model: Path) -> None:
    """The context gets a persistent CPU pool (threadpool.py) sized to its threads, freed after it."""
    from bridge.devices.placement import DevicePlacement
    from bridge.engine.worker import Runner

    runner = Runner.load(LoadSpec(model_path=str(tiny_model), model_id="tiny", n_ctx=512, n_threads=2,
                                  placement=DevicePlacement()))
    try:
        assert runner.pools is not None and len(runner.pools.pools) == 1  # one count for tokens and batches
        before = list(runner.tokenize_text("Hello there", add_bos=True))
        runner.load_prompt(before, cancelled=lambda: None)
        assert runner.cached == before  # the graph ran on the attached pool
    finally:
        runner.close()
    assert runner.pools.pools == []
