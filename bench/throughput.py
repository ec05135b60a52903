"""The bridge's generation speed against a bare low-level llama-cpp-python loop on the same model.

    python bench/throughput.py [--model FILE] [--prompt 512] [--gen 1024] [--runs 2] [--threads N]

Both sides load the same GGUF with the same settings and decode greedily with llama.cpp's native sampler
chain; the bridge also pays for its worker process, the pipe, text assembly and stop-string checks, and
the asyncio consumer. Printed: prompt processing tokens/s (time to the first token of a fresh prompt) and
decode tokens/s (first to last of `--gen` streamed tokens; end-of-generation is ignored so all are
generated), each as bridge / bare, from the best run of each side (the least disturbed on a shared
machine); and the same ratios per CPU-second (all processes involved: the worker, the server side's event
loop and reader thread), which stay meaningful when other programs compete for the CPU. The target is at
least 0.97 for decode: a cost per token that grew with the reply would show here.
Without --model it uses the ~1B-parameter random llama of the test fixtures (built on first use, ~0.5 GB).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp
import psutil

from bridge.engine import llama_log
from bridge.engine.client import Engine
from bridge.engine.types import GenerationRequest, GenerationResult, LoadSpec, SamplingParams
from bridge.engine.worker import default_threads


@dataclass
class Speeds:
    """Tokens per second of wall time, and per second of CPU time (all processes involved)."""

    prompt_tps: float
    decode_tps: float
    prompt_cpu_tps: float
    decode_cpu_tps: float


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time used so far by this process, plus by process `pid` (the bridge's worker)."""
    total = time.process_time()
    if pid is not None:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def prompts(n_vocab: int, length: int, count: int) -> list[list[int]]:
    """Distinct random prompts (distinct first tokens), so no run can reuse another's cache."""
    rng = random.Random(0)
    out = []
    for i in range(count):
        out.append([1, 1000 + i] + [rng.randrange(300, n_vocab) for _ in range(length - 2)])
    return out


# ---- the bridge ------------------------------------------------------------------------------------------

async def bridge_run(engine: Engine, prompt: list[int], n_gen: int) -> Speeds:
    req = GenerationRequest(prompt=prompt, max_tokens=n_gen, add_bos=False, sampling=SamplingParams(
        temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True))
    pid = engine.worker_pid
    cpu_start, start = cpu_seconds(pid), time.perf_counter()
    first = last = cpu_first = 0.0
    count = 0
    async for item in engine.generate(req):
        if isinstance(item, GenerationResult):
            assert item.tokens_predicted == n_gen, item
            break
        if item.token_id is None:
            continue
        last = time.perf_counter()
        count += 1
        if count == 1:
            first, cpu_first = last, cpu_seconds(pid)
    cpu_last = cpu_seconds(pid)
    return Speeds(prompt_tps=len(prompt) / (first - start), decode_tps=(count - 1) / (last - first),
                  prompt_cpu_tps=len(prompt) / (cpu_first - cpu_start),
                  decode_cpu_tps=(count - 1) / (cpu_last - cpu_first))


async def bridge_speeds(spec: LoadSpec, runs: list[list[int]], n_gen: int) -> list[Speeds]:
    engine = Engine()
    try:
        await engine.load(spec)
        return [await bridge_run(engine, prompt, n_gen) for prompt in runs]
    finally:
        await engine.close()


# ---- the bare loop ---------------------------------------------------------------------------------------

class Bare:
    """llama_decode + a greedy sampler chain, nothing else: the fastest Python can drive llama.cpp."""

    def __init__(self, spec: LoadSpec) -> None:
        llama_log.install()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        self.model = llama_cpp.llama_model_load_from_file(spec.model_path.encode(), mparams)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = spec.n_ctx or 4096, spec.n_batch, spec.n_ubatch
        cparams.n_threads = cparams.n_threads_batch = spec.n_threads or default_threads()
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = spec.n_batch
        self.one = (llama_cpp.llama_token * 1)()

    def run(self, prompt: list[int], n_gen: int) -> Speeds:
        llama_cpp.llama_memory_clear(self.mem, True)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        cpu_start, start = cpu_seconds(), time.perf_counter()
        for at in range(0, len(prompt), self.n_batch):
            part = prompt[at:at + self.n_batch]
            array = (llama_cpp.llama_token * len(part))(*part)
            llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(array, len(part)))
        token = llama_cpp.llama_sampler_sample(chain, self.ctx, -1)
        first, cpu_first = time.perf_counter(), cpu_seconds()
        for _ in range(n_gen - 1):
            self.one[0] = token
            llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(self.one, 1))
            token = llama_cpp.llama_sampler_sample(chain, self.ctx, -1)
        last, cpu_last = time.perf_counter(), cpu_seconds()
        llama_cpp.llama_sampler_free(chain)
        return Speeds(prompt_tps=len(prompt) / (first - start), decode_tps=(n_gen - 1) / (last - first),
                      prompt_cpu_tps=len(prompt) / (cpu_first - cpu_start),
                      decode_cpu_tps=(n_gen - 1) / (cpu_last - cpu_first))

    def close(self) -> None:
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def bare_speeds(spec: LoadSpec, runs: list[list[int]], n_gen: int) -> list[Speeds]:
    bare = Bare(spec)
    try:
        bare.run(runs[0][:2], 2)  # warm-up, as the bridge's worker does at load
        return [bare.run(prompt, n_gen) for prompt in runs]
    finally:
        bare.close()


# ---- main ------------------------------------------------------------------------------------------------

def model_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fixtures.tiny_model import random_1b

    print("building or reusing the ~1B random test model ...", flush=True)
    return random_1b()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the ~1B random fixture model)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--gen", type=int, default=1024, help="generated tokens (default 1024)")
    parser.add_argument("--runs", type=int, default=2, help="runs per side, alternating (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    args = parser.parse_args()

    path = model_path(args.model)
    spec = LoadSpec(model_path=str(path), model_id=path.stem, n_ctx=max(4096, args.prompt + args.gen + 16),
                    n_threads=args.threads)
    vocab_size = 32000
    runs = prompts(vocab_size, args.prompt, 2 * args.runs)
    bridge: list[Speeds] = []
    bare: list[Speeds] = []
    # Alternate the sides so that a machine getting busier or cooler affects both alike.
    for i in range(args.runs):
        bridge += asyncio.run(bridge_speeds(spec, [runs[2 * i]], args.gen))
        bare += bare_speeds(spec, [runs[2 * i + 1]], args.gen)
        print(f"run {i + 1}: bridge pp {bridge[-1].prompt_tps:8.1f} tg {bridge[-1].decode_tps:7.2f} | "
              f"bare pp {bare[-1].prompt_tps:8.1f} tg {bare[-1].decode_tps:7.2f} tokens/s", flush=True)

    # The best run of each side is the one the rest of the machine disturbed least.
    pp = max(s.prompt_tps for s in bridge) / max(s.prompt_tps for s in bare)
    tg = max(s.decode_tps for s in bridge) / max(s.decode_tps for s in bare)
    pp_cpu = max(s.prompt_cpu_tps for s in bridge) / max(s.prompt_cpu_tps for s in bare)
    tg_cpu = max(s.decode_cpu_tps for s in bridge) / max(s.decode_cpu_tps for s in bare)
    print(f"model {path.name}, prompt {args.prompt} tokens, {args.gen} generated, "
          f"threads {spec.n_threads or default_threads()}, "
          f"gpu offload {llama_cpp.llama_supports_gpu_offload()}")
    print("                   wall-clock tokens/s    per CPU-second (robust on a busy machine)")
    print(f"prompt processing  bridge/bare = {pp:.3f}    {pp_cpu:.3f}")
    print(f"decode @{args.gen:<10} bridge/bare = {tg:.3f}    {tg_cpu:.3f}    (target >= 0.97)")


if __name__ == "__main__":
    main()
