"""The bridge's generation speed beside llama-server's, through the same HTTP path, on the same model.

    python bench/throughput.py [--model FILE] [--prompt 1000] [--gen 1024] [--runs 3]

llama-server is what a user would run instead, built from the very llama.cpp sources the installed
llama-cpp-python carries (`bench/llama_server.py` builds it once and caches it). Each run starts a fresh
server (the bridge as `st-bridge serve`, llama-server with one slot), both with the same context, threads,
batch sizes and flash attention, waits until the machine has been idle for a moment, and streams one
completion in llama.cpp's dialect (`POST /completion`, `"stream": true`): `--prompt` random token ids, then
`--gen` greedy tokens with end-of-generation ignored. Printed per run, and as the median of the runs:
prompt processing tokens/s (prompt tokens / time to the first streamed token) and decode tokens/s (the
tokens after the first / time from the first to the last), and bridge / llama-server. The sides alternate,
so a machine getting busier affects both alike. Target: decode >= 0.98 and prompt >= 0.97.
Without --model it uses the ~1B-parameter random llama of the test fixtures (built on first use, ~0.5 GB).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.llama_server import Server
from bench.serving import Bridge, stream_completion, wait_idle
from bridge.engine.worker import default_threads

FIRST_TOKEN_ID = 300  # below: the fixture vocabulary's control and byte tokens


@dataclass
class Speeds:
    prompt_tps: float
    decode_tps: float
    generated: int
    quiet: bool  # the machine was idle when the run started


def start(side: str, model: Path, ctx: int, threads: int, flash_attn: bool) -> Bridge | Server:
    if side == "bridge":  # its worker takes the physical cores, as `threads` counts them
        return Bridge(model, ctx=ctx, flash_attn=flash_attn)
    return Server(model, ctx=ctx, threads=threads, extra=("-fa", "on" if flash_attn else "off"))


def one_run(side: str, model: Path, prompt: list[int], n_gen: int, ctx: int, threads: int,
            flash_attn: bool) -> Speeds:
    """A fresh server, one streamed completion of `n_gen` greedy tokens after `prompt`, the server stopped."""
    server = start(side, model, ctx, threads, flash_attn)
    try:
        quiet = wait_idle(server.pid)
        run = stream_completion(server.url, {"prompt": prompt, "n_predict": n_gen, "temperature": 0.0,
                                             "ignore_eos": True, "cache_prompt": False})
    finally:
        server.stop()
    return Speeds(prompt_tps=len(prompt) / run.first_s, decode_tps=(run.generated - 1) / run.rest_s,
                  generated=run.generated, quiet=quiet)


def prompts(length: int, count: int, n_vocab: int) -> list[list[int]]:
    """Distinct random prompts of token ids (BOS first), one per run."""
    rng = random.Random(0)
    return [[1] + [rng.randrange(FIRST_TOKEN_ID, n_vocab) for _ in range(length - 1)] for _ in range(count)]


def model_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from tests.fixtures.tiny_model import random_1b

    print("building or reusing the ~1B random test model ...", flush=True)
    return random_1b()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the ~1B random fixture model)")
    parser.add_argument("--prompt", type=int, default=1000, help="prompt tokens (default 1000)")
    parser.add_argument("--gen", type=int, default=1024, help="generated tokens (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side, alternating (default 3)")
    parser.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below this")
    parser.add_argument("--no-flash-attn", action="store_true", help="both sides without flash attention")
    args = parser.parse_args()

    path = model_path(args.model)
    threads = default_threads()
    ctx = max(4096, args.prompt + args.gen + 64)
    flash = not args.no_flash_attn
    runs = prompts(args.prompt, 2 * args.runs, args.vocab)
    sides: dict[str, list[Speeds]] = {"bridge": [], "llama-server": []}
    for i in range(args.runs):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for j, name in enumerate(order):
            speeds = one_run(name, path, runs[2 * i + j], args.gen, ctx, threads, flash)
            assert speeds.generated == args.gen, (name, speeds)
            sides[name].append(speeds)
            print(f"run {i + 1} {name:12}  prompt {speeds.prompt_tps:8.1f}  decode {speeds.decode_tps:7.2f} "
                  f"tokens/s{'' if speeds.quiet else '  (the machine was busy)'}", flush=True)

    def median(name: str, field: str) -> float:
        return statistics.median(getattr(s, field) for s in sides[name])

    pp = median("bridge", "prompt_tps") / median("llama-server", "prompt_tps")
    tg = median("bridge", "decode_tps") / median("llama-server", "decode_tps")
    print(f"model {path.name}, prompt {args.prompt} tokens, {args.gen} generated, threads {threads}, "
          f"flash attention {'on' if flash else 'off'}, median of {args.runs}")
    print(f"prompt processing  bridge/llama-server = {pp:.3f}    (target >= 0.97)")
    print(f"decode @{args.gen:<10} bridge/llama-server = {tg:.3f}    (target >= 0.98)")


if __name__ == "__main__":
    main()
