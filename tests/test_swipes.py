"""Several replies from one evaluation of the prompt (`n`, ST's "Multiple swipes per generation").

Engine level, on the tiny model: the prompt is evaluated once however many swipes are asked for, each swipe
has its own stream index and seed, a batched swipe is the reply an ordinary request would give, a swipe
after a finished reply reuses the cached prompt, and a context with one sequence (sliding-window and
recurrent models) runs the swipes one after another, still evaluating the prompt once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import llama_cpp
import pytest
import pytest_asyncio

from bridge.engine import swipes
from bridge.engine.client import Engine
from bridge.engine.types import GenerationRequest, GenerationResult, LoadSpec, SamplingParams, TokenChunk
from bridge.engine.worker import Runner

on_engine = pytest.mark.asyncio(loop_scope="module")

PROMPT = ("<|im_start|>system\nYou are Sir Aldric, a knight who guards the castle.<|im_end|>\n"
          "<|im_start|>user\nTell me the story of the dragon and the moon.<|im_end|>\n"
          "<|im_start|>assistant\n")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model: Path) -> AsyncIterator[Engine]:
    engine = Engine()
    await engine.load(LoadSpec(model_path=str(tiny_model), model_id="tiny", n_ctx=2048, n_threads=2))
    yield engine
    await engine.close()


def request(n: int, *, seed: int = 11, max_tokens: int = 24, temperature: float = 1.0,
            prompt: str = PROMPT) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, n=n,
                             sampling=SamplingParams(temperature=temperature, seed=seed, ignore_eos=True,
                                                     top_k=0, top_p=1.0, min_p=0.0))


async def run(engine: Engine, req: GenerationRequest) -> tuple[list[TokenChunk], GenerationResult]:
    items = [item async for item in engine.generate(req)]
    result = items[-1]
    assert isinstance(result, GenerationResult) and result.stop_type != "error", result
    return [i for i in items[:-1] if isinstance(i, TokenChunk)], result


def texts(chunks: list[TokenChunk], n: int) -> list[str]:
    return ["".join(c.text for c in chunks if c.index == i) for i in range(n)]


async def forget(engine: Engine) -> None:
    await run(engine, request(1, prompt="unrelated", max_tokens=1))


@on_engine
async def test_three_swipes_evaluate_the_prompt_once(engine: Engine) -> None:
    await forget(engine)
    chunks, result = await run(engine, request(3))
    assert [s.index for s in result.swipes] == [1, 2]
    assert result.tokens_evaluated - 1 <= result.timings.prompt_n <= result.tokens_evaluated  # once
    replies = texts(chunks, 3)
    assert [result.text, *(s.text for s in result.swipes)] == replies
    assert all(r for r in replies) and len(set(replies)) == 3, replies  # own seeds: three different replies
    assert result.timings.predicted_n == 3 * 24


@on_engine
async def test_each_swipe_is_the_reply_its_seed_gives_alone(engine: Engine) -> None:
    """Batched swipe i with seed s is exactly the ordinary reply with seed s + i."""
    chunks, _ = await run(engine, request(3, seed=5, max_tokens=12))
    batched = texts(chunks, 3)
    for i in range(3):
        _, alone = await run(engine, request(1, seed=5 + i, max_tokens=12))
        assert alone.text == batched[i], i


@on_engine
async def test_a_swipe_after_a_finished_reply_reuses_the_cached_prompt(engine: Engine) -> None:
    await forget(engine)
    _, first = await run(engine, request(1))
    assert first.timings.prompt_n >= first.tokens_evaluated - 1
    _, again = await run(engine, request(4))
    assert again.tokens_cached >= again.tokens_evaluated - 2  # the prompt came from the cache
    assert again.timings.prompt_n <= 2


def test_one_sequence_contexts_run_the_swipes_in_turn(tiny_model: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A context with one sequence (what sliding-window and recurrent models get) still answers `n`:
    round after round, each evaluating one prompt token again for its logits."""
    monkeypatch.setattr(swipes, "capacity", lambda model: 1)
    runner = Runner.load(LoadSpec(model_path=str(tiny_model), model_id="tiny", n_ctx=2048, n_threads=2,
                                  chat_memory_mib=0))
    try:
        assert llama_cpp.llama_n_seq_max(runner.ctx) == 1
        chunks: list[TokenChunk] = []
        result = runner.generate(request(3, max_tokens=8), chunks.append, lambda: None)
        n_prompt = result.tokens_evaluated
        assert result.timings.prompt_n == n_prompt + 2  # the prompt, then one token per further round
        assert [s.index for s in result.swipes] == [1, 2]
        assert texts(chunks, 3) == [result.text, *(s.text for s in result.swipes)]
        assert runner.cached[:n_prompt] == runner.prompt_tokens(request(1))
    finally:
        runner.close()


def test_batched_swipes_leave_only_the_first_in_the_cache(tiny_model: Path) -> None:
    runner = Runner.load(LoadSpec(model_path=str(tiny_model), model_id="tiny", n_ctx=2048, n_threads=2,
                                  chat_memory_mib=0))
    try:
        assert llama_cpp.llama_n_seq_max(runner.ctx) == swipes.MAX_PARALLEL
        result = runner.generate(request(4, max_tokens=8), lambda chunk: None, lambda: None)
        mem = runner.mem
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == len(runner.cached) - 1
        assert all(llama_cpp.llama_memory_seq_pos_max(mem, s) == -1 for s in range(1, 4))
        assert len(runner.cached) == result.tokens_evaluated + result.tokens_predicted - 1
    finally:
        runner.close()
