"""What llama.cpp's abort callback costs (engine/progress.py), and how soon a cancel lands with it.

Runs the ~1B random model (tests/fixtures/tiny_model.py) on the CPU and prints, each as a ratio against the
same work without the callback in the same run:

* prompt processing (512-token batches) with the watch installed, as the engine runs prompts;
* token-by-token decoding with the callback installed too (the engine does not do this; the figure says why);
* the time from asking to cancel to `llama_decode` returning, in the middle of a 512-token batch, beside
  how long that batch takes whole (what a cancel waited for before).

    python bench/compute_watch.py [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp

from bridge.engine.progress import DECODE_ABORTED, ComputeWatch
from bridge.engine.vocab import init_backend
from tests.fixtures.tiny_model import random_1b

BATCH = 512


def context(model: llama_cpp.llama_model_p, threads: int) -> llama_cpp.llama_context_p:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 4096, BATCH, BATCH
    params.n_threads = params.n_threads_batch = threads
    return llama_cpp.llama_init_from_model(model, params)


def decode(ctx: llama_cpp.llama_context_p, tokens: list[int], start: int) -> int:
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    for i, token in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
    batch.n_tokens = len(tokens)
    try:
        return llama_cpp.llama_decode(ctx, batch)
    finally:
        llama_cpp.llama_batch_free(batch)


def prompt_seconds(ctx: llama_cpp.llama_context_p, watch: ComputeWatch | None) -> float:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    tokens = [(i * 7) % 900 + 3 for i in range(BATCH)]
    started = time.perf_counter()
    if watch is None:
        decode(ctx, tokens, 0)
    else:
        with watch.watching(stop=lambda: False, beat=lambda: None):
            decode(ctx, tokens, 0)
    return time.perf_counter() - started


def decode_seconds(ctx: llama_cpp.llama_context_p, watch: ComputeWatch | None, n: int = 32) -> float:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    decode(ctx, [3, 4, 5, 6], 0)
    started = time.perf_counter()
    for i in range(n):
        if watch is None:
            decode(ctx, [(i * 11) % 900 + 3], 4 + i)
        else:
            with watch.watching(stop=lambda: False):
                decode(ctx, [(i * 11) % 900 + 3], 4 + i)
    return time.perf_counter() - started


def cancel_latency(ctx: llama_cpp.llama_context_p, watch: ComputeWatch, after_s: float) -> tuple[float, int]:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    asked: dict[str, float] = {}
    timer = threading.Timer(after_s, lambda: asked.setdefault("at", time.perf_counter()))
    timer.start()
    tokens = [(i * 7) % 900 + 3 for i in range(BATCH)]
    with watch.watching(stop=lambda: "at" in asked):
        rc = decode(ctx, tokens, 0)
    returned = time.perf_counter()
    timer.cancel()
    return returned - asked.get("at", returned), rc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    init_backend()
    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(random_1b()).encode(), params)
    ctx = context(model, args.threads)
    watch = ComputeWatch(ctx)
    decode_seconds(ctx, None, 4)  # warm-up

    # Alternated, so a machine that gets busier or quieter meanwhile weighs on both sides alike.
    plain, watched = [], []
    for _ in range(args.rounds):
        plain.append(prompt_seconds(ctx, None))
        watched.append(prompt_seconds(ctx, watch))
    p, w = statistics.median(plain), statistics.median(watched)
    print(f"prompt batch ({BATCH} tokens): {p:.2f} s plain, {w:.2f} s watched; ratio {p / w:.3f} "
          f"({watch.nodes} graph nodes per batch, so ~{watch.nodes / w:.0f} callbacks/s)")
    plain_d, watched_d = [], []
    for _ in range(args.rounds):
        plain_d.append(decode_seconds(ctx, None))
        watched_d.append(decode_seconds(ctx, watch))
    pd, wd = statistics.median(plain_d), statistics.median(watched_d)
    print(f"token decode (32 tokens): {pd:.3f} s plain, {wd:.3f} s with the callback; ratio {pd / wd:.3f}")
    batch_s = statistics.median(plain)
    latencies = []
    for _ in range(args.rounds):
        latency, rc = cancel_latency(ctx, watch, batch_s / 3)
        assert rc == DECODE_ABORTED, rc
        latencies.append(latency)
    print(f"cancel a third into a {batch_s:.1f} s batch: returns after "
          f"{statistics.median(latencies) * 1000:.0f} ms (max {max(latencies) * 1000:.0f} ms); without the "
          "callback it waits for the batch to end")
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
