"""N swipes in one request against N requests one after another: prompt tokens evaluated and wall time.

    python bench/swipes.py [--model FILE] [--n 4] [--prompt 1500] [--reply 128] [--repeat 1] [--threads T]

The engine runs in this process (the worker's `Runner`, as the bridge runs it) on the ~1B random llama of
the test fixtures unless `--model` says otherwise. Three ways to get N replies to one chat prompt:

* `n=N`: one request (ST's "Multiple swipes per generation"): the prompt is evaluated once and the N
  replies decode together, one batch per step (bridge/engine/swipes.py);
* N requests, the bridge's cache kept: what ST does without multi-swipe, on the bridge (each later request
  finds the prompt cached and evaluates its last token again);
* N requests, no cache: a backend that evaluates every prompt from scratch.

Each starts from an empty cache. Replies are forced to full length (end-of-text banned), greedy sampling
is not used (each reply has its own seed), so all three generate N x reply tokens. With `--repeat R` the
three run R times in turn and the fastest of each is printed (a busy machine slows some runs down).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp

from bridge.engine.types import GenerationRequest, LoadSpec, SamplingParams
from bridge.engine.worker import Runner, default_threads

WORDS = ["the", "dragon", "knight", "castle", "moon", "smile", "whisper", "voice", "night", "story", "gate",
         "traveller", "shelter", "fire", "sword", "shield", "tower", "kingdom", "shadow", "light"]


def chat_prompt(runner: Runner, n_tokens: int) -> str:
    """A ChatML chat of about `n_tokens` tokens ending with the reply header."""
    rng = random.Random(7)
    text = "<|im_start|>system\nYou are Sir Aldric, who guards the castle.<|im_end|>\n"
    role = "user"
    while len(runner.tokenize_text(text, True)) < n_tokens:
        words = " ".join(rng.choice(WORDS) for _ in range(40))
        text += f"<|im_start|>{role}\n{words}<|im_end|>\n"
        role = "assistant" if role == "user" else "user"
    return text + "<|im_start|>assistant\n"


def request(prompt: str, reply: int, n: int, seed: int) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=reply, n=n,
                             sampling=SamplingParams(temperature=1.0, seed=seed, ignore_eos=True))


def forget(runner: Runner) -> None:
    llama_cpp.llama_memory_clear(runner.mem, True)
    runner.cached = []


def batched(runner: Runner, prompt: str, reply: int, n: int) -> tuple[int, float, int]:
    forget(runner)
    started = time.perf_counter()
    result = runner.generate(request(prompt, reply, n, seed=1), lambda chunk: None, lambda: None)
    return result.timings.prompt_n, time.perf_counter() - started, result.timings.predicted_n


def one_by_one(runner: Runner, prompt: str, reply: int, n: int, *, cache: bool) -> tuple[int, float, int]:
    forget(runner)
    evaluated = predicted = 0
    started = time.perf_counter()
    for i in range(n):
        if not cache:
            forget(runner)
        result = runner.generate(request(prompt, reply, 1, seed=1 + i), lambda chunk: None, lambda: None)
        evaluated += result.timings.prompt_n
        predicted += result.tokens_predicted
    return evaluated, time.perf_counter() - started, predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF (default: the ~1B test fixture)")
    parser.add_argument("--n", type=int, default=4, help="swipes")
    parser.add_argument("--prompt", type=int, default=1500, help="prompt tokens")
    parser.add_argument("--reply", type=int, default=128, help="tokens per swipe")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each way; the fastest is printed")
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()
    if args.model is None:
        from tests.fixtures.tiny_model import random_1b

        args.model = random_1b()
    runner = Runner.load(LoadSpec(model_path=str(args.model), model_id=args.model.stem, n_ctx=4096,
                                  n_threads=args.threads, chat_memory_mib=0))
    try:
        prompt = chat_prompt(runner, args.prompt)
        n_prompt = len(runner.tokenize_text(prompt, True))
        print(f"{args.model.name}: {n_prompt}-token prompt, {args.n} swipes of {args.reply} tokens, "
              f"{args.threads} threads, {llama_cpp.llama_n_seq_max(runner.ctx)} sequences per context")
        n, reply = args.n, args.reply
        ways = {
            f"n={n}, one request": lambda: batched(runner, prompt, reply, n),
            f"{n} requests, cache kept": lambda: one_by_one(runner, prompt, reply, n, cache=True),
            f"{n} requests, no cache": lambda: one_by_one(runner, prompt, reply, n, cache=False),
        }
        runs: dict[str, list[tuple[int, float, int]]] = {label: [] for label in ways}
        for _ in range(args.repeat):
            for label, way in ways.items():
                runs[label].append(way())
                print(f"  {label}: {runs[label][-1][1]:.1f} s", flush=True)
        rows = [(label, min(done, key=lambda run: run[1])) for label, done in runs.items()]
    finally:
        runner.close()
    base = rows[0][1][1]
    header = f"{'':30} {'prompt tokens evaluated':>24} {'tokens generated':>17} {'wall s':>8}"
    print(f"{header} {'x n=' + str(args.n):>7}")
    for label, (evaluated, wall, predicted) in rows:
        print(f"{label:30} {evaluated:>24} {predicted:>17} {wall:>8.1f} {wall / base:>7.2f}")


if __name__ == "__main__":
    main()
