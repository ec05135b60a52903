"""This machine's CPU speed for llama.cpp, measured once and kept per machine; `speed.py` scales it to models.

On first use the bridge writes a small llama model of real Q4_K blocks (`random_gguf.write_q4k_model`,
about 180 MB: larger than a CPU's last-level cache, so writing streams from RAM as a real model does),
then a child process loads it on the CPU alone with the engine's thread count, reads a 512-token prompt
and writes 48 tokens, twice, and keeps the faster run of each (a moment of contention from other
programs is not the machine's speed). With the model's own bytes and FLOPs per token (`speed.ModelCost`,
the same rules that predict every other model) the two rates become the CPU's usable bandwidth and
compute. The whole measurement takes a few seconds; the result is cached in the data folder under a key
naming the CPU, the thread count and the llama.cpp version, so a new build or another machine measures
again.

`python -m bridge.calibrate MODEL THREADS PROMPT DECODE RUNS` is the child; it prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from . import fit, speed
from .errors import EngineError
from .gguf import read_file
from .hardware import HardwareReport
from .random_gguf import Shape, write_q4k_model

log = logging.getLogger(__name__)

CACHE_NAME = "speed-calibration.json"
SCHEMA = 1
# Dimensions of a small Llama (2048 wide, like Llama-3.2-1B) so its matrix products run the kernels, and
# at the efficiency, of real models; 4 blocks and a 32000-token vocabulary make ~180 MB.
SHAPE = Shape(n_layer=4, n_embd=2048, n_ff=5632, n_head=16, n_head_kv=4, n_ctx_train=4096, n_vocab=32000)
PROMPT_TOKENS = 512
DECODE_TOKENS = 48
RUNS = 2
TIMEOUT_S = 180.0


@dataclass
class Calibration:
    machine: str
    threads: int
    prompt_tokens: int
    prompt_tok_s: float
    decode_tok_s: float
    bytes_per_token: float  # what the calibration model streams per written token
    flops_per_token: float  # what it computes per prompt token
    measured_at: float
    seconds: float  # how long the measurement took, writing the model included

    def cpu_speed(self) -> speed.CpuSpeed:
        return speed.CpuSpeed(
            self.bytes_per_token * self.decode_tok_s, self.flops_per_token * self.prompt_tok_s, True,
            f"measured here: {self.prompt_tok_s:.0f} prompt and {self.decode_tok_s:.0f} written tokens/s "
            f"on a {self.bytes_per_token / 1e6:.0f} MB Q4_K model, {self.threads} threads")


def machine_key(report: HardwareReport, threads: int) -> str:
    cpu = report.cpu
    return (f"{cpu.model} | {cpu.cores_physical} cores, {cpu.cores_logical} threads | "
            f"avx2={cpu.avx2} avx512={cpu.avx512} | llama.cpp {report.llama_cpp_version} | {threads} used")


def engine_threads() -> int:
    from .engine.worker import default_threads

    return default_threads()


# --- the cache --------------------------------------------------------------------------------------


def cached(data_dir: Path, report: HardwareReport, threads: int | None = None) -> Calibration | None:
    key = machine_key(report, threads or engine_threads())
    found = _read(data_dir / CACHE_NAME).get(key)
    return Calibration(**found) if found else None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("machines", {}) if data.get("schema") == SCHEMA else {}


def _save(data_dir: Path, result: Calibration) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / CACHE_NAME
    machines = _read(path) | {result.machine: asdict(result)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"schema": SCHEMA, "machines": machines}, indent=1), encoding="utf-8")
    tmp.replace(path)


def cpu_speed(data_dir: Path | None, report: HardwareReport, *, measure_missing: bool = True,
              threads: int | None = None) -> speed.CpuSpeed:
    """The CPU's figures for `report`'s machine: measured (once, then from the cache), else estimated.

    A what-if machine keeps this machine's CPU, so it keeps its measurement too. Without llama.cpp, or if
    the measurement fails, the estimate serves and the failure is logged once per call.
    """
    if data_dir is None or report.llama_cpp_version is None:
        return speed.CpuSpeed.estimated(report)
    n = threads or engine_threads()
    found = cached(data_dir, report, n)
    if found is None and measure_missing:
        data_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(data_dir / (CACHE_NAME + ".lock"))):  # one measurement, however many callers
            found = cached(data_dir, report, n)
            if found is None:
                found = _measure_and_save(data_dir, report, n)
    return found.cpu_speed() if found else speed.CpuSpeed.estimated(report)


def _measure_and_save(data_dir: Path, report: HardwareReport, threads: int) -> Calibration | None:
    log.info("measuring this machine's speed once (a few seconds)")
    try:
        result = measure(report, threads)
    except EngineError as exc:
        log.warning("could not measure this machine's speed (%s); using estimates", exc.message)
        return None
    _save(data_dir, result)
    log.info("%s", result.cpu_speed().note)
    return result


# --- measuring --------------------------------------------------------------------------------------


def measure(report: HardwareReport, threads: int, *, prompt_tokens: int = PROMPT_TOKENS,
            decode_tokens: int = DECODE_TOKENS, runs: int = RUNS, shape: Shape = SHAPE,
            timeout_s: float = TIMEOUT_S) -> Calibration:
    """Write the calibration model, time it in a child process, and turn the rates into CPU figures."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="st-bridge-speed-") as tmp:
        path = write_q4k_model(Path(tmp) / "speed-probe-Q4_K.gguf", shape, name="speed-probe")
        rates = run_child(path, threads, prompt_tokens, decode_tokens, runs, timeout_s)
        bytes_per_token, flops_per_token = work_per_token(path, prompt_tokens)
    return Calibration(machine_key(report, threads), threads, prompt_tokens, rates["prompt_tok_s"],
                       rates["decode_tok_s"], bytes_per_token, flops_per_token, time.time(),
                       round(time.perf_counter() - started, 2))


def work_per_token(path: Path, prompt_tokens: int) -> tuple[float, float]:
    """(bytes streamed per written token, FLOPs per prompt token) of a GGUF run on the CPU alone, by the
    rules `speed.predict` uses: predicting the calibration model gives back the measured rates."""
    layout = fit.ModelLayout.from_header(read_file(path))
    bd = fit.memory_breakdown(layout, fit.FitParams(n_ctx=prompt_tokens + DECODE_TOKENS + 16))
    unit = speed.CpuSpeed(1.0, 1.0, True, "")  # seconds at 1 byte/s and 1 FLOP/s: bytes and FLOPs
    cost = speed.ModelCost.of(layout)
    return (speed.decode_seconds(cost, bd, [], unit),
            speed.prompt_seconds(cost, bd, [], unit, kv_len=prompt_tokens / 2))


def run_child(path: Path, threads: int, prompt_tokens: int, decode_tokens: int, runs: int,
              timeout_s: float = TIMEOUT_S) -> dict[str, float]:
    command = [sys.executable, "-m", "bridge.calibrate", str(path), str(threads), str(prompt_tokens),
               str(decode_tokens), str(runs)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"the speed measurement did not finish within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        tail = " / ".join(line.strip() for line in proc.stderr.splitlines()[-3:] if line.strip())
        raise EngineError(f"the speed measurement failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the child side ---------------------------------------------------------------------------------


def _timed_rates(path: str, threads: int, prompt_tokens: int, decode_tokens: int,
                 runs: int) -> dict[str, float]:
    """Runs in the child: the best prompt and decode rates of `runs` runs, on the CPU alone."""
    import llama_cpp

    from .devices.placement import DevicePlacement, model_params
    from .engine.vocab import init_backend

    init_backend()
    mp = llama_cpp.llama_model_default_params()
    keep = model_params(mp, DevicePlacement(), 0)  # no device: a CUDA build must not take the batches
    model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
    del keep
    if not model:
        raise RuntimeError("llama.cpp could not load the speed probe")
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = prompt_tokens + decode_tokens + 16
    cp.n_batch = cp.n_ubatch = speed.N_UBATCH
    cp.n_threads = cp.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context for the speed probe")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    tokens = [3 + (i * 7919) % (n_vocab - 3) for i in range(prompt_tokens + decode_tokens)]
    mem = llama_cpp.llama_get_memory(ctx)
    _decode(ctx, tokens[:8], 0)  # first touch: page faults and lazy set-up are not the machine's speed
    best = dict.fromkeys(("prompt_tok_s", "decode_tok_s", "prompt_cpu_tok_s", "decode_cpu_tok_s"), 0.0)
    for _ in range(runs):
        llama_cpp.llama_memory_clear(mem, True)
        t0, c0 = time.perf_counter(), time.process_time()
        for at in range(0, prompt_tokens, speed.N_UBATCH):
            _decode(ctx, tokens[at:min(at + speed.N_UBATCH, prompt_tokens)], at)
        t1, c1 = time.perf_counter(), time.process_time()
        for i in range(decode_tokens):
            _decode(ctx, [tokens[prompt_tokens + i]], prompt_tokens + i)
        t2, c2 = time.perf_counter(), time.process_time()
        # Wall time is the speed; CPU time (with one thread: the same, less the moments another program
        # had the core) lets a test compare two measurements taken on a busy machine.
        for key, n, wall, cpu in (("prompt", prompt_tokens, t1 - t0, c1 - c0),
                                  ("decode", decode_tokens, t2 - t1, c2 - c1)):
            best[f"{key}_tok_s"] = max(best[f"{key}_tok_s"], n / wall)
            best[f"{key}_cpu_tok_s"] = max(best[f"{key}_cpu_tok_s"], n / max(cpu, 1e-9))
    return best


def _decode(ctx: Any, tokens: list[int], pos: int) -> None:
    import llama_cpp

    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1  # as a prompt batch: only the last token's logits
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the speed probe")
    finally:
        llama_cpp.llama_batch_free(batch)


def main(argv: list[str]) -> int:
    path, threads, prompt_tokens, decode_tokens, runs = argv[0], *map(int, argv[1:5])
    print(json.dumps(_timed_rates(path, threads, prompt_tokens, decode_tokens, runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
