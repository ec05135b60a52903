"""Prompt work per chat turn, with prompt reuse and context shift, beside full reprocessing.

    python bench/chat_turns.py [--model FILE] [--turns 60] [--ctx 2048 4096] [--reply 96] [--chats 2]

Replays a chat the way SillyTavern builds its prompts: a fixed character card on top, then the newest
messages that fit in the context (minus the reply length), oldest dropped first, then the reply header.
Each turn adds a user message and the model's reply. One engine keeps its cache between turns (the
bridge); a second one is emptied before every turn (full reprocessing). Printed per turn and as medians
over the turns where the context was full: prompt tokens evaluated and time to first token. Target: at
least 10 times less prompt work than reprocessing once the context is full.

With `--chats 2` two chats (two characters) take turns, as when a user switches between ST chats: the
bridge saves the chat it leaves and restores it when it comes back (per-chat memory). A third engine with
per-chat memory off shows what switching costs without it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.engine.client import Engine
from bridge.engine.types import GenerationRequest, GenerationResult, LoadSpec, SamplingParams

CARD = (
    "<|im_start|>system\nYou are Sir Aldric, an old knight who guards the castle at the edge of the "
    "kingdom. You speak softly, remember every story, and never leave the castle at night. The user is a "
    "traveller who arrived at the gate at dusk, looking for shelter from the dragon that hunts under the "
    "moon. Stay in character, describe the scene, and keep each reply to a few sentences.<|im_end|>\n"
)
WORDS = ["the", "dragon", "knight", "castle", "moon", "smile", "whisper", "voice", "night", "story", "hello",
         "world", "softly", "gate", "traveller", "shelter", "fire", "sword", "shield", "tower", "old",
         "kingdom", "dusk", "hunt", "wing", "shadow", "light"]
HEADER = "<|im_start|>assistant\n"
OTHER_CARD = (
    "<|im_start|>system\nYou are Mira, who rows the ferry across the black river below the old tower. You "
    "are curious and a little sly, you trade stories for passage, and you know every shadow on the water. "
    "The user is a stranger with a lantern who needs to cross before the dragon flies over the kingdom. "
    "Stay in character and keep each reply to a few sentences.<|im_end|>\n"
)


@dataclass
class Turn:
    prompt_tokens: int
    full: bool  # the prompt had to drop old messages
    reuse_evaluated: int
    reuse_ttft_ms: float
    scratch_evaluated: int
    scratch_ttft_ms: float
    plain_evaluated: int | None = None  # per-chat memory off (--chats 2)
    plain_ttft_ms: float | None = None


def user_message(rng: random.Random) -> str:
    return f"<|im_start|>user\n{' '.join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))}<|im_end|>\n"


def build_prompt(engine: Engine, card: str, history: list[str], budget: int) -> tuple[str, bool]:
    """ST's layout: the card, then the newest messages that fit, then the reply header."""
    used = len(engine.tokenize(card + HEADER, add_bos=True))
    kept: list[str] = []
    for message in reversed(history):
        size = len(engine.tokenize(message))
        if used + size > budget:
            break
        kept.append(message)
        used += size
    return card + "".join(reversed(kept)) + HEADER, len(kept) < len(history)


async def timed(engine: Engine, prompt: str, reply: int, seed: int) -> tuple[GenerationResult, float]:
    req = GenerationRequest(prompt=prompt, max_tokens=reply, stop=["<|im_end|>"],
                            sampling=SamplingParams(temperature=0.8, seed=seed, min_tokens=reply // 2))
    start = time.perf_counter()
    ttft = 0.0
    result = None
    async for item in engine.generate(req):
        if isinstance(item, GenerationResult):
            result = item
        elif not ttft:
            ttft = (time.perf_counter() - start) * 1000
    assert result is not None and result.stop_type != "error", result
    return result, ttft


async def replay(path: Path, n_ctx: int, turns: int, reply: int, chats: int = 1) -> list[Turn]:
    spec = LoadSpec(model_path=str(path), model_id=path.stem, n_ctx=n_ctx)
    engines = [Engine(), Engine()] + ([Engine()] if chats > 1 else [])
    bridge, scratch = engines[0], engines[1]
    plain = engines[2] if chats > 1 else None
    await bridge.load(spec)
    await scratch.load(LoadSpec(model_path=str(path), model_id=path.stem, n_ctx=n_ctx, chat_memory_mib=0))
    if plain is not None:
        await plain.load(LoadSpec(model_path=str(path), model_id=path.stem, n_ctx=n_ctx, chat_memory_mib=0))
    rng = random.Random(n_ctx)
    cards = [CARD, OTHER_CARD][:chats]
    histories: list[list[str]] = [[] for _ in cards]
    out: list[Turn] = []
    try:
        for turn in range(turns):
            which = turn % len(cards)
            history = histories[which]
            history.append(user_message(rng))
            prompt, full = build_prompt(bridge, cards[which], history, n_ctx - reply)
            result, ttft = await timed(bridge, prompt, reply, seed=turn)
            await timed(scratch, "<|im_start|>", 1, seed=0)  # empties its cache of this chat
            again, scratch_ttft = await timed(scratch, prompt, 1, seed=turn)
            t = Turn(result.tokens_evaluated, full, result.timings.prompt_n, ttft,
                     again.timings.prompt_n, scratch_ttft)
            if plain is not None:
                # One token is enough: the other chat's turn replaces this cache before this chat comes back.
                alone, t.plain_ttft_ms = await timed(plain, prompt, 1, seed=turn)
                t.plain_evaluated = alone.timings.prompt_n
            history.append(f"<|im_start|>assistant\n{result.text}<|im_end|>\n")
            out.append(t)
            print(f"  turn {turn + 1:3d}{' ' + 'AB'[which] if chats > 1 else ''}  prompt {t.prompt_tokens:5d}"
                  f"{' full' if full else '     '}  evaluated {t.reuse_evaluated:5d}"
                  f"{' restored' if result.cache_restored else ''} (reprocessing {t.scratch_evaluated:5d}"
                  f"{_plain(t.plain_evaluated, '')})  first token {t.reuse_ttft_ms:8.1f} ms (reprocessing "
                  f"{t.scratch_ttft_ms:8.1f} ms{_plain(t.plain_ttft_ms, ' ms')})", flush=True)
    finally:
        for engine in engines:
            await engine.close()
    return out


def _plain(value: float | None, unit: str) -> str:
    return "" if value is None else f", memory off {value:.0f}{unit}"


def summary(n_ctx: int, turns: list[Turn]) -> None:
    full = [t for t in turns if t.full]
    if not full:
        print(f"ctx {n_ctx}: the chat never filled the context; use more --turns")
        return
    reuse = statistics.median(t.reuse_evaluated for t in full)
    scratch = statistics.median(t.scratch_evaluated for t in full)
    ttft = statistics.median(t.reuse_ttft_ms for t in full)
    scratch_ttft = statistics.median(t.scratch_ttft_ms for t in full)
    print(f"ctx {n_ctx}: {len(full)} turns at full context, median prompt tokens evaluated {reuse:.0f} vs "
          f"{scratch:.0f} reprocessing ({scratch / max(reuse, 1):.1f}x less work, target >= 10x); "
          f"median first token {ttft:.1f} ms vs {scratch_ttft:.1f} ms")
    plain = [t for t in full if t.plain_evaluated is not None]
    if plain:
        evaluated = statistics.median(t.plain_evaluated or 0 for t in plain)
        plain_ttft = statistics.median(t.plain_ttft_ms or 0.0 for t in plain)
        print(f"ctx {n_ctx}: two chats taking turns, per-chat memory off: median {evaluated:.0f} tokens "
              f"evaluated ({evaluated / max(reuse, 1):.1f}x the bridge's), first token {plain_ttft:.1f} ms")


def model_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from tests.fixtures.tiny_model import tiny_ladder

    return tiny_ladder()["Q8_0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file with a ChatML vocabulary (default: the tiny test model)")
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--ctx", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--reply", type=int, default=96, help="reply length in tokens (ST's response length)")
    parser.add_argument("--chats", type=int, choices=[1, 2], default=1,
                        help="2: two chats take turns (per-chat memory against none)")
    args = parser.parse_args()
    path = model_path(args.model)
    results = {}
    for n_ctx in args.ctx:
        print(f"ctx {n_ctx}, {args.turns} turns, model {path.name}")
        results[n_ctx] = asyncio.run(replay(path, n_ctx, args.turns, args.reply, args.chats))
    for n_ctx, turns in results.items():
        summary(n_ctx, turns)


if __name__ == "__main__":
    main()
