"""One model split across this machine's CPU and two `st-bridge worker`s on 127.0.0.1, against the same
model unsplit: decode tokens/s of both, their ratio, and the greedy text of both (it must be the same).

    python bench/split.py [--model FILE] [--gen 128] [--ctx 2048] [--runs 2]

The workers lend just enough memory for the planner to put layers on each and keep some on the local CPU
(three devices). On one machine the workers share its cores and memory bandwidth with the bridge, so the
ratio shows the cost of the split itself (process hops, RPC round trips, one device after another), not
what a second PC adds; the predicted network cost per token is printed beside it.
Without --model it uses the ~1B-parameter random llama of the test fixtures at Q8_0 (built on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge import fit, hardware
from bridge.engine.client import Engine
from bridge.engine.types import GenerationRequest, GenerationResult, LoadSpec, SamplingParams, TokenChunk
from bridge.gguf import read_file
from bridge.workers.registry import registry
from tests.fixtures.rpc import lent_for_split, start_worker

PROMPT = "Once upon a time, in a castle by the sea, the dragon said to the knight"


async def run(spec: LoadSpec, n_gen: int) -> tuple[str, float]:
    engine = Engine()
    try:
        await engine.load(spec)
        req = GenerationRequest(prompt=PROMPT, max_tokens=n_gen,
                                sampling=SamplingParams(temperature=0.0, top_k=1, ignore_eos=True))
        items = [item async for item in engine.generate(req)]
    finally:
        await engine.close()
    result = items[-1]
    assert isinstance(result, GenerationResult) and result.stop_type == "limit", result
    return "".join(i.text for i in items if isinstance(i, TokenChunk)), result.timings.predicted_per_second


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the ~1B random fixture model)")
    parser.add_argument("--gen", type=int, default=128, help="generated tokens (default 128)")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=2, help="runs per side, alternating (default 2)")
    args = parser.parse_args()
    if args.model:
        path = Path(args.model)
    else:
        from tests.fixtures.tiny_model import random_1b

        # Q8_0: the local CPU and an RPC server then run the same kernels. A Q4_K model is repacked into a
        # faster layout on this machine's CPU but not in an RPC server's buffers, so the two sides would
        # sum in another order, and a random-weights model's near-ties would part the greedy texts.
        path = random_1b("Q8_0")
    # One thread everywhere: the workers run one each, and the devices of a split work one after another, so
    # both sides compute with one core at a time (and a busy machine's descheduled threads cannot stall a
    # multi-threaded side at its barriers).
    base = LoadSpec(model_path=str(path), model_id=path.stem, n_ctx=args.ctx, chat_memory_mib=0, n_threads=1)
    lent = str(lent_for_split(path, args.ctx, workers=2))
    workers = [start_worker("--memory", lent), start_worker("--memory", lent)]
    unsplit: list[tuple[str, float]] = []
    split: list[tuple[str, float]] = []
    try:
        registry.configure([], [w.address for w in workers])
        registry.refresh()
        plan = fit.plan(read_file(path), hardware.probe(), fit.FitParams(n_ctx=args.ctx))
        placement = plan.placement()
        bd = plan.breakdown
        split_spec = LoadSpec(model_path=str(path), model_id=path.stem, n_ctx=bd.n_ctx, kv_type=bd.kv_type_k,
                              flash_attn=bd.flash_attn, chat_memory_mib=0, placement=placement, n_threads=1)
        # Alternate the sides, so that a machine getting busier affects both alike; the best run of each
        # side is the one the rest of the machine disturbed least.
        for _ in range(args.runs):
            unsplit.append(await run(base, args.gen))
            split.append(await run(split_spec, args.gen))
            print(f"unsplit {unsplit[-1][1]:.2f} tok/s, split {split[-1][1]:.2f} tok/s", flush=True)
    finally:
        for worker in workers:
            worker.stop()
    unsplit_text, unsplit_tps = unsplit[0][0], max(tps for _, tps in unsplit)
    split_text, split_tps = split[0][0], max(tps for _, tps in split)
    rtts = [r.rtt_ms for r in registry.ready()]
    cpu_layers = bd.n_layer + 1 - placement.n_gpu_layers
    print(f"model {path.name}: {bd.n_layer + 1} layers; split: {cpu_layers} on this CPU, "
          + ", ".join(f"{n} on {d}" for d, n in zip(placement.devices, placement.layers, strict=True)))
    print(f"round trip to each worker: {', '.join(f'{r:.3f} ms' for r in rtts if r is not None)}")
    print(f"decode @{args.gen}: unsplit {unsplit_tps:.2f} tok/s, split {split_tps:.2f} tok/s, "
          f"split/unsplit = {split_tps / unsplit_tps:.3f}")
    print(f"greedy text identical: {split_text == unsplit_text}")
    if split_text != unsplit_text:
        print(f"  unsplit: {unsplit_text[:120]!r}\n  split:   {split_text[:120]!r}")
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
