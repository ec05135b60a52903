"""How fast `st-bridge recommend` answers with a cached catalog, beside just reading that catalog's JSON.

    python bench/recommend_speed.py [--repeat 20] [--ctx 8192] [--no-cli]

Two cached catalogs are timed, each saved the way a refresh saves it (`catalog-cache.json` in a data dir):

* **survey**: the bundled figures (what a first run, or an offline one, has);
* **with headers**: every file also carries a per-layer tensor table, as after `st-bridge catalog refresh`
  reads each file's GGUF header. The tables are laid out from each model's shape and file size (the
  planner's fallback), so the cache has the size and structure of a refreshed one without a network.

For each: the baseline, `json.loads` of the cache file alone; `catalog.load` (the JSON into the catalog's
types); and `recommend()` end to end (load, then plan and rank every model and quant for a 12 GB GPU +
32 GB desktop, fixed so the figures do not depend on this machine). Medians over `--repeat` runs, in ms,
and the ratio to the baseline.

Then the whole command as a new process, `python -m bridge recommend --json` on each cache, hardware probe
and imports included (median of `--cli-runs`), beside a process that only imports the modules the command
uses: the difference is the probe, the catalog and the planner. The processes write their bytecode to a
temporary folder (after one untimed run), as an installed package has it, so a source tree run with
PYTHONDONTWRITEBYTECODE does not time the compiler. Targets: the command under 0.5 s on a 2-core machine
(issue 5); `recommend()` under 1 s with the larger catalog and the speed predictions (issue 15), reported
in wall time and in CPU time, which other programs on a busy machine do not inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge import catalog, recommend
from bridge.hardware import CPUInfo, GPUInfo, HardwareReport

REPO = Path(__file__).resolve().parents[1]


def desktop() -> HardwareReport:
    """A 12 GB GPU (504 GB/s) with 32 GB of dual-channel DDR4: the guide's mid profile."""
    return HardwareReport(
        cpu=CPUInfo("desktop", 8, 16, True, False),
        ram_total_mib=32 * 1024,
        ram_available_mib=int(32 * 1024 * 0.8),
        swap_total_mib=0,
        swap_free_mib=0,
        gpus=[GPUInfo(0, "GeForce", 12 * 1024, 12 * 1024 - 400, 400, bandwidth_gbs=504.0)],
        gpu_offload_supported=True,
        cpu_bandwidth_gbs=51.2,
    )


def with_headers(cat: catalog.Catalog) -> catalog.Catalog:
    """The catalog with a tensor table for every file, as a full refresh leaves it."""
    for model in cat.models:
        for f in model.files:
            model.headers[f.file] = catalog.layout_to_dict(recommend.estimated_layout(model, f))
    return cat


def median_ms(fn: Callable[[], object], repeat: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median milliseconds of `fn` by `clock`: wall time, or `time.process_time` (CPU time, which other
    programs on a busy machine do not inflate)."""
    fn()  # warm: imports and caches, as in any but the first call
    times = []
    for _ in range(repeat):
        started = clock()
        fn()
        times.append((clock() - started) * 1000)
    return statistics.median(times)


def bench(name: str, cat: catalog.Catalog, data_dir: Path, repeat: int, n_ctx: int) -> None:
    path = catalog.save_cache(cat, data_dir)
    machine = desktop()
    base = median_ms(lambda: json.loads(path.read_text(encoding="utf-8")), repeat)
    load = median_ms(lambda: catalog.load(data_dir), repeat)
    rec = median_ms(lambda: recommend.recommend(catalog.load(data_dir), machine, n_ctx=n_ctx), repeat)
    rec_cpu = median_ms(lambda: recommend.recommend(catalog.load(data_dir), machine, n_ctx=n_ctx), repeat,
                        time.process_time)
    files = sum(len(m.files) for m in cat.models)
    print(f"\n{name}: {len(cat.models)} models, {files} files, cache {path.stat().st_size / 1e6:.1f} MB")
    print(f"  read the JSON (baseline)   {base:8.1f} ms   1.0x")
    print(f"  catalog.load               {load:8.1f} ms  {load / base:5.1f}x")
    print(f"  recommend() end to end     {rec:8.1f} ms  {rec / base:5.1f}x   ({rec_cpu:.1f} ms of CPU)")


# What `st-bridge recommend` imports, in the order it does: the floor under the whole command.
IMPORTS_ONLY = "import bridge.cli, bridge.hardware, bridge.recommend, bridge.config, llama_cpp"


def process_ms(args: list[str], env: dict[str, str], runs: int) -> float:
    """Median wall time of `python *args` as a new process, after one untimed run (bytecode, disk cache)."""
    command = [sys.executable, *args]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def bench_cli(dirs: dict[str, Path], n_ctx: int, runs: int, pycache: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    floor = process_ms(["-c", IMPORTS_ONLY], env, runs)
    print(f"\n`st-bridge recommend --json` as a new process, median of {runs} (12 GB GPU + 32 GB what-if):")
    print(f"  imports alone (floor)      {floor:8.0f} ms   1.0x")
    for name, data_dir in dirs.items():
        command = ["-m", "bridge", "recommend", "--json", "--ctx", str(n_ctx), "--gpu-mib", "12288",
                   "--ram-mib", "32768", "--data-dir", str(data_dir)]  # fmt: skip
        wall = process_ms(command, env, runs)
        print(f"  whole command, {name:12} {wall:8.0f} ms  {wall / floor:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per figure (median)")
    parser.add_argument("--ctx", type=int, default=recommend.DEFAULT_CTX, help="target context")
    parser.add_argument("--cli-runs", type=int, default=5, help="timed runs of the whole command (median)")
    parser.add_argument("--no-cli", action="store_true", help="skip the whole-command timing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"survey": Path(tmp) / "survey", "with headers": Path(tmp) / "headers"}
        bench("survey", catalog.bundled(), dirs["survey"], args.repeat, args.ctx)
        bench("with headers", with_headers(catalog.bundled()), dirs["with headers"], args.repeat, args.ctx)
        if not args.no_cli:
            bench_cli(dirs, args.ctx, args.cli_runs, Path(tmp) / "pycache")


if __name__ == "__main__":
    main()
