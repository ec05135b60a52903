"""Prompt work per chat turn, beside llama-server with `--cache-reuse 256 --context-shift`, through HTTP.

    python bench/chat_turns.py [--model FILE] [--turns 60] [--ctx 2048 4096] [--reply 96] [--chats 2]

Replays a chat the way SillyTavern builds its prompts: a fixed character card on top, then the newest
messages that fit in the context (minus the reply length), oldest dropped first, then the reply header.
Each turn adds a user message and the model's reply. Both servers run side by side on the same model and
context (the bridge as `st-bridge serve`, llama-server built from the same llama.cpp sources by
`bench/llama_server.py`, one slot), each with a chat of its own replies, and each turn goes to one, then
the other, as a streamed `POST /completion`. Printed per turn and as medians over the turns where the
context was full: prompt tokens evaluated (`timings.prompt_n`) and time to the first streamed token.

With `--chats 2` two chats (two characters) take turns, as when a user switches between ST chats: the
bridge keeps each chat's state (per-chat memory), llama-server its prompt cache in RAM (`--cache-ram`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.llama_server import Server
from bench.serving import Bridge, post_json, stream_completion
from bridge.engine.worker import default_threads

CARD = (
    "<|im_start|>system\nYou are Sir Aldric, an old knight who guards the castle at the edge of the "
    "kingdom. You speak softly, remember every story, and never leave the castle at night. The user is a "
    "traveller who arrived at the gate at dusk, looking for shelter from the dragon that hunts under the "
    "moon. Stay in character, describe the scene, and keep each reply to a few sentences.<|im_end|>\n"
)
OTHER_CARD = (
    "<|im_start|>system\nYou are Mira, who rows the ferry across the black river below the old tower. You "
    "are curious and a little sly, you trade stories for passage, and you know every shadow on the water. "
    "The user is a stranger with a lantern who needs to cross before the dragon flies over the kingdom. "
    "Stay in character and keep each reply to a few sentences.<|im_end|>\n"
)
WORDS = ["the", "dragon", "knight", "castle", "moon", "smile", "whisper", "voice", "night", "story", "hello",
         "world", "softly", "gate", "traveller", "shelter", "fire", "sword", "shield", "tower", "old",
         "kingdom", "dusk", "hunt", "wing", "shadow", "light"]
HEADER = "<|im_start|>assistant\n"
SIDES = ("bridge", "llama-server")
LLAMA_SERVER_REUSE = ("--cache-reuse", "256", "--context-shift")


@dataclass
class Turn:
    prompt_tokens: int
    full: bool  # the prompt had to drop old messages
    evaluated: int
    ttft_ms: float


@dataclass
class Side:
    """One server and the chats as it answered them."""

    url: str
    histories: list[list[str]]
    turns: list[Turn] = field(default_factory=list)

    def count(self, text: str, add_special: bool = False) -> int:
        return len(post_json(f"{self.url}/tokenize", {"content": text, "add_special": add_special})["tokens"])


def user_message(rng: random.Random) -> str:
    return f"<|im_start|>user\n{' '.join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))}<|im_end|>\n"


def build_prompt(side: Side, card: str, history: list[str], budget: int) -> tuple[str, bool]:
    """ST's layout: the card, then the newest messages that fit, then the reply header."""
    used = side.count(card + HEADER, add_special=True)
    kept: list[str] = []
    for message in reversed(history):
        size = side.count(message)
        if used + size > budget:
            break
        kept.append(message)
        used += size
    return card + "".join(reversed(kept)) + HEADER, len(kept) < len(history)


def take_turn(side: Side, which: int, card: str, message: str, n_ctx: int, reply: int, seed: int) -> Turn:
    history = side.histories[which]
    history.append(message)
    prompt, full = build_prompt(side, card, history, n_ctx - reply)
    run = stream_completion(side.url, {"prompt": prompt, "n_predict": reply, "temperature": 0.8,
                                       "seed": seed, "ignore_eos": True, "cache_prompt": True})
    history.append(f"{HEADER}{run.text}<|im_end|>\n")
    timings = run.final.get("timings", {})
    turn = Turn(int(run.final.get("tokens_evaluated") or 0), full, int(timings.get("prompt_n") or 0),
                run.first_s * 1000)
    side.turns.append(turn)
    return turn


def replay(path: Path, n_ctx: int, turns: int, reply: int, chats: int) -> dict[str, list[Turn]]:
    servers = [Bridge(path, ctx=n_ctx, flash_attn=True),
               Server(path, ctx=n_ctx, threads=default_threads(), extra=("-fa", "on", *LLAMA_SERVER_REUSE))]
    cards = [CARD, OTHER_CARD][:chats]
    sides = {name: Side(server.url, [[] for _ in cards]) for name, server in zip(SIDES, servers, strict=True)}
    rng = random.Random(n_ctx)
    try:
        for turn in range(turns):
            which = turn % len(cards)
            message = user_message(rng)
            done = {name: take_turn(side, which, cards[which], message, n_ctx, reply, seed=turn)
                    for name, side in sides.items()}
            print(f"  turn {turn + 1:3d}{' ' + 'AB'[which] if chats > 1 else ''}  " + "  |  ".join(
                f"{name} prompt {t.prompt_tokens:5d}{' full' if t.full else '     '} "
                f"evaluated {t.evaluated:5d} first token {t.ttft_ms:8.1f} ms" for name, t in done.items()),
                flush=True)
    finally:
        for server in servers:
            server.stop()
    return {name: side.turns for name, side in sides.items()}


def summary(n_ctx: int, results: dict[str, list[Turn]]) -> None:
    full = {name: [t for t in turns if t.full] for name, turns in results.items()}
    if not all(full.values()):
        print(f"ctx {n_ctx}: the chat never filled the context; use more --turns")
        return
    parts = []
    for name, turns in full.items():
        evaluated = statistics.median(t.evaluated for t in turns)
        ttft = statistics.median(t.ttft_ms for t in turns)
        prompt = statistics.median(t.prompt_tokens for t in turns)
        parts.append(f"{name}: {len(turns)} turns at full context (prompt {prompt:.0f} tokens), "
                     f"median evaluated {evaluated:.0f}, first token {ttft:.1f} ms")
    print(f"ctx {n_ctx}: " + "; ".join(parts))


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
    parser.add_argument("--chats", type=int, choices=[1, 2], default=1, help="2: two chats take turns")
    args = parser.parse_args()
    path = model_path(args.model)
    results = {}
    for n_ctx in args.ctx:
        print(f"ctx {n_ctx}, {args.turns} turns, {args.chats} chat(s), model {path.name}")
        results[n_ctx] = replay(path, n_ctx, args.turns, args.reply, args.chats)
    for n_ctx, sides in results.items():
        summary(n_ctx, sides)


if __name__ == "__main__":
    main()
