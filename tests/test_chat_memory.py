"""Per-chat memory: switching between chats saves the left chat's KV state and restores it when it comes back.

The engine tests run the tiny model for real: its KV state is about 2 KB per token, so a chat of
`FIRST` messages (~300 tokens) is ~0.6 MB and a 1 MiB budget holds one such chat but not two. The
store's own tests use plain bytes.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bridge.engine.chat_memory import MIN_WORTH, ChatMemory, leaves
from bridge.engine.client import Engine
from bridge.engine.reuse import ReusePlan
from bridge.engine.types import GenerationRequest, GenerationResult, LoadSpec, SamplingParams

WORDS = ["the", "dragon", "knight", "castle", "moon", "smile", "whisper", "voice", "night", "story", "hello",
         "world", "softly", "river", "lantern", "forest"]
FIRST, BACK = 6, 8  # messages when a chat is first seen, and when it comes back
CARDS = {
    "a": "<|im_start|>system\nYou are Sir Aldric, a knight who guards the castle.<|im_end|>\n",
    "b": "<|im_start|>system\nYou are Mira, a ferry woman on the night river.<|im_end|>\n",
    "c": "<|im_start|>system\nYou are Old Tom, the keeper of the forest lantern.<|im_end|>\n",
}


def message(chat: str, i: int) -> str:
    rng = random.Random(f"{chat}{i}")
    role = "user" if i % 2 == 0 else "assistant"
    return f"<|im_start|>{role}\n{' '.join(rng.choice(WORDS) for _ in range(25))}<|im_end|>\n"


def chat(name: str, messages: int) -> str:
    """ST's prompt for chat `name`: its card, its first `messages` messages, then the reply header."""
    return CARDS[name] + "".join(message(name, i) for i in range(messages)) + "<|im_start|>assistant\n"


@asynccontextmanager
async def running(path: Path, **spec: Any) -> AsyncIterator[Engine]:
    engine = Engine()
    await engine.load(LoadSpec(model_path=str(path), model_id=path.stem, n_ctx=2048, n_threads=1, **spec))
    try:
        yield engine
    finally:
        await engine.close()


async def generate(engine: Engine, prompt: str, max_tokens: int = 8) -> tuple[list[int], GenerationResult]:
    req = GenerationRequest(prompt=prompt, max_tokens=max_tokens,
                            sampling=SamplingParams(temperature=0.0, ignore_eos=True))
    items = [item async for item in engine.generate(req)]
    result = items[-1]
    assert isinstance(result, GenerationResult) and result.stop_type == "limit", result
    return [i.token_id for i in items[:-1] if getattr(i, "token_id", None) is not None], result


def new_tokens(engine: Engine, before: str, after: str) -> int:
    return len(engine.tokenize(after, add_bos=True)) - len(engine.tokenize(before, add_bos=True))


# ---- the engine ----------------------------------------------------------------------------------------

async def test_switching_between_two_chats_reprocesses_neither(tiny_model: Path) -> None:
    async with running(tiny_model) as engine, running(tiny_model, chat_memory_mib=0) as scratch:
        first = {name: (await generate(engine, chat(name, FIRST)))[1] for name in ("a", "b")}
        assert not first["b"].cache_restored
        assert first["b"].tokens_cached < 12  # a new chat: BOS and "<|im_start|>system\nYou are"
        for name in ("a", "b"):  # each chat comes back with two more messages
            prompt = chat(name, BACK)
            ids, back = await generate(engine, prompt, max_tokens=24)
            assert back.cache_restored
            assert back.tokens_cached >= first[name].tokens_evaluated - 4
            assert back.timings.prompt_n <= new_tokens(engine, chat(name, FIRST), prompt) + 4
            # The restored state is the one the chat left: greedy output equals a from-scratch run.
            await generate(scratch, "unrelated", max_tokens=1)
            scratch_ids, fresh = await generate(scratch, prompt, max_tokens=24)
            assert fresh.tokens_cached <= 1 and not fresh.cache_restored
            assert ids == scratch_ids


async def test_a_next_turn_or_a_regenerated_reply_is_the_same_chat(tiny_model: Path) -> None:
    async with running(tiny_model) as engine:
        await generate(engine, chat("a", FIRST))
        _, regenerated = await generate(engine, chat("a", FIRST))  # a swipe: the same prompt again
        _, turn = await generate(engine, chat("a", BACK))
        _, other = await generate(engine, chat("b", FIRST))
        _, back = await generate(engine, chat("a", BACK + 2))
    assert not regenerated.cache_restored and not turn.cache_restored and not other.cache_restored
    # Had the swipe or the next turn saved the chat, this would have come back from a shorter state.
    assert back.cache_restored and back.tokens_cached >= turn.tokens_evaluated - 4


async def test_a_small_budget_keeps_the_most_recently_left_chat(tiny_model: Path) -> None:
    async with running(tiny_model, chat_memory_mib=1) as engine:
        for name in ("a", "b", "c"):  # leaving b evicts a: both do not fit in 1 MiB
            await generate(engine, chat(name, FIRST))
        _, b = await generate(engine, chat("b", BACK))
        _, a = await generate(engine, chat("a", BACK))
    assert b.cache_restored and b.tokens_cached > 200
    assert not a.cache_restored and a.tokens_cached < 12


async def test_a_budget_of_zero_turns_it_off(tiny_model: Path) -> None:
    async with running(tiny_model, chat_memory_mib=0) as engine:
        await generate(engine, chat("a", FIRST))
        await generate(engine, chat("b", FIRST))
        _, back = await generate(engine, chat("a", BACK))
    assert not back.cache_restored and back.tokens_cached < 12


async def test_states_beyond_the_ram_budget_spill_to_disk(tiny_model: Path, tmp_path: Path) -> None:
    async with running(tiny_model, chat_memory_mib=1, chat_memory_disk_mib=2,
                       chat_memory_dir=str(tmp_path)) as engine:
        for name in ("a", "b", "c"):  # leaving b pushes a out of RAM onto disk
            await generate(engine, chat(name, FIRST))
        assert len(list(tmp_path.rglob("*.state"))) == 1
        _, a = await generate(engine, chat("a", BACK))  # from disk (its file is gone then)
        assert a.cache_restored and a.tokens_cached > 200
        assert len(list(tmp_path.rglob("*.state"))) == 1  # c moved in, b out to disk; a left the store
    assert not any(tmp_path.iterdir())  # the worker's folder goes with it


async def test_a_load_clears_the_store(tiny_models: dict[str, Path]) -> None:
    async with running(tiny_models["Q8_0"]) as engine:
        await generate(engine, chat("a", FIRST))
        await generate(engine, chat("b", FIRST))  # a is saved, under Q8_0
        await engine.load(LoadSpec(model_path=str(tiny_models["Q6_K"]), model_id="q6", n_ctx=2048,
                                   n_threads=1))
        _, back = await generate(engine, chat("a", BACK))
    assert not back.cache_restored and back.tokens_cached < 12


# ---- when a prompt belongs to another chat ---------------------------------------------------------------

def test_another_chat_throws_away_the_cached_end_and_brings_its_own() -> None:
    big = 10 * MIN_WORTH
    # Chat switch, even with a shared card longer than either chat's messages.
    assert leaves(ReusePlan(prefix=big), cached=big + MIN_WORTH, prompt=big + MIN_WORTH)
    # Next turn: nothing cached is thrown away.
    assert not leaves(ReusePlan(prefix=big), cached=big, prompt=big + 5 * MIN_WORTH)
    # A regenerated reply: the old reply goes, but the prompt brings nothing new.
    assert not leaves(ReusePlan(prefix=big - 1), cached=big + 5 * MIN_WORTH, prompt=big)
    # A trimmed chat: old messages dropped and the rest shifted, the cached end kept.
    shifted = ReusePlan(prefix=MIN_WORTH, dropped=3 * MIN_WORTH, shifted=big)
    assert not leaves(shifted, cached=4 * MIN_WORTH + big, prompt=MIN_WORTH + big + 2 * MIN_WORTH)


# ---- the store --------------------------------------------------------------------------------------------

def state(size: int, fill: int = 1) -> bytearray:
    return bytearray([fill]) * size


def test_the_store_restores_the_state_serving_the_most_tokens() -> None:
    memory = ChatMemory(ram_bytes=1000)
    memory.put([1, 2, 3, *range(100, 200)], state(10, 1))
    memory.put([1, 2, 3, *range(300, 400)], state(10, 2))
    prompt = [1, 2, 3, *range(300, 350), 7]
    match = memory.best(prompt, can_shift=True, better_than=3)
    assert match is not None and match.reused == 53
    tokens, data = memory.take(match.key) or ([], bytearray())
    assert tokens[3] == 300 and data == state(10, 2)
    assert len(memory.entries) == 1  # a restored state leaves the store
    assert memory.best(prompt, can_shift=True, better_than=53) is None


def test_the_ram_budget_evicts_the_least_recently_used() -> None:
    memory = ChatMemory(ram_bytes=250)
    for fill in (1, 2, 3):
        memory.put([fill] * 50, state(100, fill))
    assert [e.tokens[0] for e in memory.entries.values()] == [2, 3]
    assert memory.ram_used == 200
    memory.put([9] * 50, state(300))  # larger than the whole budget: not kept, nothing evicted
    assert memory.ram_used == 200 and not memory.fits(300)


def test_a_budget_of_zero_keeps_nothing() -> None:
    memory = ChatMemory(ram_bytes=0, disk_bytes=10**6, disk_dir="/nonexistent")
    memory.put([1] * 50, state(10))
    assert not memory.enabled and not memory.entries


def test_the_disk_tier_writes_whole_files_and_removes_evicted_ones(tmp_path: Path) -> None:
    memory = ChatMemory(ram_bytes=100, disk_bytes=250, disk_dir=tmp_path)
    for fill in (1, 2, 3, 4):
        memory.put([fill] * 50, state(100, fill))
    # 4 in RAM; 2 and 3 on disk; 1 evicted from disk (3 files would exceed 250 bytes).
    assert [(e.tokens[0], e.path is not None) for e in memory.entries.values()] == [
        (2, True), (3, True), (4, False)]
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 2 and all(name.endswith(".state") for name in files)  # no temporary left over
    key = next(iter(memory.entries))
    assert memory.take(key) == ([2] * 50, state(100, 2))
    assert len(list(tmp_path.rglob("*.state"))) == 1
    memory.close()
    assert not any(tmp_path.iterdir())


def test_the_disk_folder_of_a_crashed_process_is_removed(tmp_path: Path) -> None:
    gone = tmp_path / "999999999"  # no such process
    gone.mkdir()
    (gone / "1.state").write_bytes(b"old")
    memory = ChatMemory(ram_bytes=100, disk_bytes=100, disk_dir=tmp_path)
    assert not gone.exists() and (tmp_path / str(os.getpid())).is_dir()
    memory.close()


def test_an_unwritable_disk_folder_leaves_ram_only(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    memory = ChatMemory(ram_bytes=100, disk_bytes=100, disk_dir=blocker / "sub")
    assert memory.enabled and memory.folder is None and not memory.fits(150)


@pytest.mark.parametrize("ram", [-1, 0])
def test_a_negative_or_zero_budget_is_off(ram: int) -> None:
    assert not ChatMemory(ram_bytes=ram).enabled
