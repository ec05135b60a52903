"""Prompt reuse: the KV cache survives between requests; appended and trimmed chats evaluate only what is new.

Counts follow llama-server: `tokens_evaluated` = prompt tokens of the request, `tokens_cached` = those
served from the cache, `timings.prompt_n` = those actually evaluated (the difference).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import llama_cpp
import pytest
import pytest_asyncio

from bridge.engine.client import Engine
from bridge.engine.reuse import MIN_SHIFT_MATCH, ReusePlan, common_prefix, plan_reuse
from bridge.engine.types import GenerationRequest, GenerationResult, LoadSpec, SamplingParams, TokenChunk
from bridge.engine.worker import SETTLE_MAX_TOKENS, SETTLE_THREADS, Runner

on_engine = pytest.mark.asyncio(loop_scope="module")

CARD = ("<|im_start|>system\nYou are Sir Aldric, a knight who guards the castle. Stay in character and "
        "tell the story of the dragon and the moon.<|im_end|>\n")
WORDS = ["the", "dragon", "knight", "castle", "moon", "smile", "whisper", "voice", "night", "story", "hello",
         "world", "softly"]


def message(i: int) -> str:
    """Chat message i, as ST formats it with a ChatML instruct template."""
    rng = random.Random(i)
    role = "user" if i % 2 == 0 else "assistant"
    return f"<|im_start|>{role}\n{' '.join(rng.choice(WORDS) for _ in range(25))}<|im_end|>\n"


def chat(first: int, last: int) -> str:
    """ST's prompt: the card on top, messages first..last-1 below, then the reply header."""
    return CARD + "".join(message(i) for i in range(first, last)) + "<|im_start|>assistant\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model: Path) -> AsyncIterator[Engine]:
    engine = Engine()
    await engine.load(LoadSpec(model_path=str(tiny_model), model_id="tiny", n_ctx=4096, n_threads=1))
    yield engine
    await engine.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fresh(tiny_model: Path) -> AsyncIterator[Engine]:
    """A second engine, emptied before each use, for from-scratch answers."""
    engine = Engine()
    await engine.load(LoadSpec(model_path=str(tiny_model), model_id="tiny", n_ctx=4096, n_threads=1))
    yield engine
    await engine.close()


async def generate(engine: Engine, prompt: str, max_tokens: int = 16,
                   n_probs: int = 0) -> tuple[list[TokenChunk], GenerationResult]:
    req = GenerationRequest(prompt=prompt, max_tokens=max_tokens,
                            sampling=SamplingParams(temperature=0.0, ignore_eos=True, n_probs=n_probs))
    items = [item async for item in engine.generate(req)]
    assert isinstance(items[-1], GenerationResult)
    return [i for i in items[:-1] if isinstance(i, TokenChunk)], items[-1]


async def from_scratch(engine: Engine, prompt: str,
                       **kwargs: int) -> tuple[list[TokenChunk], GenerationResult]:
    await generate(engine, "unrelated", max_tokens=1)  # leaves nothing of `prompt` in its cache
    chunks, result = await generate(engine, prompt, **kwargs)
    assert result.tokens_cached <= 1  # at most the BOS token is shared
    return chunks, result


@on_engine
async def test_a_second_turn_evaluates_only_the_new_tokens(engine: Engine) -> None:
    first = chat(0, 6)
    _, turn1 = await generate(engine, first)
    assert turn1.tokens_evaluated == len(engine.tokenize(first, add_bos=True))
    second = chat(0, 8)  # two more messages appended
    _, turn2 = await generate(engine, second)
    new_tokens = len(engine.tokenize(second, add_bos=True)) - len(engine.tokenize(first, add_bos=True))
    # Everything up to the old reply header is reused; the header itself differs ("assistant" vs "user").
    assert turn2.tokens_evaluated - turn2.tokens_cached == turn2.timings.prompt_n
    assert new_tokens <= turn2.timings.prompt_n <= new_tokens + 4
    assert turn2.tokens_cached >= turn1.tokens_evaluated - 4


@on_engine
async def test_a_turn_carrying_the_reply_evaluates_only_what_follows_it(engine: Engine) -> None:
    first = chat(0, 6)
    chunks, turn1 = await generate(engine, first, max_tokens=32)
    generated = engine.tokenize(first, add_bos=True) + [c.token_id for c in chunks if c.token_id is not None]
    respelled = engine.tokenize(first + turn1.text, add_bos=True)
    # Random weights pick tokens the tokenizer would not: the reply comes back spelled differently.
    assert respelled != generated
    await asyncio.sleep(1.0)  # the user reads and types; the worker re-spells the reply meanwhile
    follow = "<|im_end|>\n" + message(100) + "<|im_start|>assistant\n"
    _, turn2 = await generate(engine, first + turn1.text + follow)
    assert turn2.tokens_cached >= len(respelled) - 1
    assert turn2.timings.prompt_n <= len(engine.tokenize(follow)) + 1


@on_engine
async def test_a_reply_spelled_unlike_the_tokenizer_from_early_on_is_left_to_the_next_prompt(
        engine: Engine) -> None:
    """Settling is bounded: a long tail (random weights write one) is not re-evaluated in the background;
    the next prompt evaluates it, as it would without settling."""
    first = chat(0, 4)
    chunks, turn1 = await generate(engine, first, max_tokens=2 * SETTLE_MAX_TOKENS)
    generated = engine.tokenize(first, add_bos=True) + [c.token_id for c in chunks if c.token_id is not None]
    respelled = engine.tokenize(first + turn1.text, add_bos=True)
    same = common_prefix(generated, respelled)
    assert len(respelled) - same > SETTLE_MAX_TOKENS  # the case this test is about
    await asyncio.sleep(1.0)  # time enough to settle it, were it settled
    _, turn2 = await generate(engine, first + turn1.text + "<|im_end|>\n" + message(100))
    assert same - 1 <= turn2.tokens_cached <= same


def test_settling_runs_on_one_thread_and_only_on_a_short_tail(tiny_model: Path) -> None:
    """The re-spelling after a reply leaves the other cores to the user's programs, and a tail longer than
    SETTLE_MAX_TOKENS is left alone (in the worker's own Runner, driven directly)."""
    runner = Runner.load(LoadSpec(model_path=str(tiny_model), model_id="tiny", n_ctx=2048, n_threads=2))
    threads: list[int] = []

    def idle() -> bool:
        threads.append(llama_cpp.llama_n_threads(runner.ctx))
        return True

    def as_generated(reply: str) -> None:
        """The cache as after a reply written one character per token (no tokenizer would spell it so)."""
        spelled = [t for c in reply for t in runner.tokenize_text(c, add_bos=False)]
        runner.load_prompt(runner.tokenize_text(prompt, add_bos=True) + spelled, cancelled=lambda: None)

    try:
        prompt = chat(0, 2)
        as_generated(short := " the dragon and the knight")
        runner.settle(prompt + short, add_bos=True, idle=idle)
        assert runner.cached == runner.tokenize_text(prompt + short, add_bos=True)  # settled
        assert set(threads[1:]) == {SETTLE_THREADS} == {1}  # [0]: the check before it starts
        assert llama_cpp.llama_n_threads(runner.ctx) == 2  # the load's own count is back for generating

        long = " the dragon" * SETTLE_MAX_TOKENS
        as_generated(long)
        before, threads[:] = list(runner.cached), []
        runner.settle(prompt + long, add_bos=True, idle=idle)
        assert runner.cached == before and not threads  # left to the next prompt: no work now
    finally:
        runner.close()


@on_engine
async def test_the_same_prompt_again_evaluates_one_token(engine: Engine) -> None:
    prompt = chat(0, 4)
    await generate(engine, prompt)
    _, again = await generate(engine, prompt)
    assert again.timings.prompt_n == 1  # the last token is evaluated again for its logits
    assert again.tokens_cached == again.tokens_evaluated - 1


@on_engine
async def test_a_trimmed_chat_is_served_by_shifting_the_cache(engine: Engine, fresh: Engine) -> None:
    await generate(engine, chat(0, 12))
    trimmed = chat(3, 13)  # ST dropped the 3 oldest messages (the card stays) and added one
    _, shifted = await generate(engine, trimmed)
    card = len(engine.tokenize(CARD, add_bos=True))
    kept = sum(len(engine.tokenize(message(i))) for i in range(3, 12))
    tail = len(engine.tokenize(message(12) + "<|im_start|>assistant\n"))
    assert shifted.tokens_evaluated == len(engine.tokenize(trimmed, add_bos=True))
    assert shifted.tokens_cached >= card + kept - 4  # the card and the 9 kept messages came from the cache
    assert shifted.timings.prompt_n <= tail + 4  # only the new message was evaluated
    _, scratch = await from_scratch(fresh, trimmed)
    assert scratch.timings.prompt_n >= scratch.tokens_evaluated - 1  # what reprocessing costs
    assert shifted.timings.prompt_n * 5 < scratch.timings.prompt_n


@on_engine
async def test_generation_after_a_shift_matches_from_scratch_where_it_can(engine: Engine,
                                                                         fresh: Engine) -> None:
    # The shifted cache keeps the values the kept messages got while the dropped ones were still in view,
    # so it is close to, not identical with, a fresh evaluation (KoboldCpp's ContextShift makes the same
    # trade). Measured on this model (Q8_0, greedy, 40 tokens) for 1, 2, 4 and 6 dropped messages: the
    # first token always agreed, the top-5 log-probabilities of the first step differed by at most
    # 0.04 / 0.14 / 0.11 / 0.27 nats, and the greedy continuations agreed for the first 23 / 40 / 7 / 40
    # tokens before a near-tie flipped. Random weights give near-uniform attention, the worst case for
    # this; trained models attend locally and diverge less. The RoPE re-rotation itself is exact.
    await generate(engine, chat(0, 12), max_tokens=1)
    prompt = chat(2, 13)
    shifted_chunks, shifted = await generate(engine, prompt, n_probs=5)
    assert shifted.tokens_cached > shifted.tokens_evaluated // 2  # it really shifted
    scratch_chunks, _ = await from_scratch(fresh, prompt, n_probs=5)
    assert shifted_chunks[0].token_id == scratch_chunks[0].token_id
    ours = {p.token_id: p.logprob for p in shifted_chunks[0].top}
    theirs = {p.token_id: p.logprob for p in scratch_chunks[0].top}
    common = ours.keys() & theirs.keys()
    assert len(common) >= 3
    assert max(abs(ours[t] - theirs[t]) for t in common) < 0.5


@on_engine
async def test_a_different_chat_reuses_only_the_shared_start(engine: Engine) -> None:
    before = chat(0, 6)
    await generate(engine, before)
    other = "<|im_start|>system\nA completely different card.<|im_end|>\n" + message(50)
    _, result = await generate(engine, other)
    ours, theirs = engine.tokenize(other, add_bos=True), engine.tokenize(before, add_bos=True)
    shared = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
    assert shared < 8 and result.tokens_cached == shared  # BOS and "<|im_start|>system\n"
    assert result.timings.prompt_n == result.tokens_evaluated - result.tokens_cached


# ---- the plan, on plain token lists ----------------------------------------------------------------------

def test_plan_prefix_and_last_token() -> None:
    assert plan_reuse([], [1, 2, 3]) == ReusePlan(0)
    assert plan_reuse([1, 2, 3], [1, 2, 3, 4, 5]) == ReusePlan(3)
    assert plan_reuse([1, 2, 3], [1, 2, 3]) == ReusePlan(2)  # the last token is evaluated for its logits
    assert plan_reuse([1, 2, 3, 9, 9], [1, 2, 3, 4]) == ReusePlan(3)


def test_plan_shift_drops_the_middle() -> None:
    top, dropped, kept, new = [1] * 5, list(range(100, 140)), list(range(200, 260)), [7, 8, 9]
    plan = plan_reuse(top + dropped + kept, top + kept + new)
    assert plan == ReusePlan(prefix=5, dropped=40, shifted=60)
    assert plan.reused == 65


def test_plan_shift_needs_a_long_enough_match_and_support() -> None:
    top, dropped, kept = [1] * 5, list(range(100, 140)), list(range(200, 200 + MIN_SHIFT_MATCH - 1))
    assert plan_reuse(top + dropped + kept, top + kept + [7]).shifted == 0
    kept = list(range(200, 260))
    assert plan_reuse(top + dropped + kept, top + kept + [7], can_shift=False) == ReusePlan(5)


def test_plan_shift_leaves_the_last_prompt_token() -> None:
    top, dropped, kept = [1] * 5, list(range(100, 140)), list(range(200, 260))
    plan = plan_reuse(top + dropped + kept, top + kept)
    assert plan.reused == len(top + kept) - 1
