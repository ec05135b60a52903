"""Exact mode: ask llama.cpp itself what it would allocate, by a dry run that allocates nothing.

llama-cpp-python 0.3.36 exposes `llama_model_params.no_alloc` ("only load metadata and simulate memory
allocations"). It works only with `load_mode = LLAMA_LOAD_MODE_NONE`: with the default mmap mode
llama.cpp hits `GGML_ASSERT(!ml.no_alloc)` and aborts the whole process. So the dry run always happens in
a child process (`python -m bridge.fit_exact`), never in the server.

The child loads the model and creates a context with the planned settings, and hands back llama.cpp's
log. The figures come from that log: the device of each layer, the KV cache size and the compute buffer
of each backend. Model buffers read 0.00 MiB in this mode, so the weights come from the GGUF tensor
table, placed the way llama.cpp reported. `llama_get_memory_breakdown()` would give the same figures
but is not exposed by llama-cpp-python 0.3.36, and neither are tensor buffer overrides, so `--cpu-moe`
cannot be measured this way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import BadRequest, EngineError
from .fit import (
    CUDA_CONTEXT_MIB,
    Breakdown,
    DeviceMemory,
    FitParams,
    HostMemory,
    ModelLayout,
    Plan,
    explain,
    host_overhead_bytes,
    memory_breakdown,
    mib,
    resolve_attention,
)
from .gguf import read_file

DRY_RUN_TIMEOUT_S = 120
KV_TYPE_IDS = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type
FLASH_ATTN_IDS = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type
CONTEXT_MARK = "\n@@ st-bridge: next context @@\n"

LAYER_RE = re.compile(r"load_tensors: layer +(\d+) assigned to device (\S+?),")
KV_LAYER_RE = re.compile(r"llama_kv_cache: layer +\d+: dev = (\S+)")
KV_SIZE_RE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB")
COMPUTE_RE = re.compile(r"(\S+) compute buffer size = +([\d.]+) MiB")
OUTPUT_RE = re.compile(r"(\S+) +output buffer size = +([\d.]+) MiB")
N_CTX_RE = re.compile(r"llama_context: n_ctx += (\d+)")
FA_RE = re.compile(r"llama_context: flash_attn += (\w+)|Flash Attention (enabled|disabled)")


@dataclass
class DryRun:
    """What llama.cpp's log says about one dry run. Backend names are llama.cpp's: CPU, CUDA0, ..."""

    layer_device: dict[int, str] = field(default_factory=dict)  # block index (n_layer = output) -> device
    kv_mib: dict[str, float] = field(default_factory=dict)
    compute_mib: dict[str, float] = field(default_factory=dict)
    output_mib: dict[str, float] = field(default_factory=dict)
    n_ctx: int | None = None
    flash_attn: bool | None = None


def parse_log(text: str) -> DryRun:
    """Read the dry run's figures from llama.cpp's log. Each KV cache (two for sliding-window models)
    lists its layers' devices and then its size; the size is shared out over those layers."""
    run = DryRun()
    kv_devices: list[str] = []
    for line in text.splitlines():
        if m := LAYER_RE.search(line):
            run.layer_device[int(m[1])] = m[2]
        elif m := KV_LAYER_RE.search(line):
            kv_devices.append(m[1])
        elif m := KV_SIZE_RE.search(line):
            _share_kv(run, kv_devices, float(m[1]))
            kv_devices = []
        elif m := COMPUTE_RE.search(line):
            run.compute_mib[m[1]] = run.compute_mib.get(m[1], 0.0) + float(m[2])
        elif m := OUTPUT_RE.search(line):
            run.output_mib[m[1]] = float(m[2])
        elif m := N_CTX_RE.search(line):
            run.n_ctx = int(m[1])
        elif m := FA_RE.search(line):
            _read_fa(run, m)
    return run


def _share_kv(run: DryRun, devices: list[str], size_mib: float) -> None:
    devices = devices or ["CPU"]
    for dev in devices:
        run.kv_mib[dev] = run.kv_mib.get(dev, 0.0) + size_mib / len(devices)


def _read_fa(run: DryRun, m: re.Match[str]) -> None:
    word = (m[1] or m[2]).lower()
    if word in ("enabled", "disabled"):
        run.flash_attn = word == "enabled"


def gpu_index(device: str) -> int | None:
    """CUDA0 -> 0, Vulkan1 -> 1; None for the host (CPU, CUDA_Host, CPU_Mapped ...)."""
    if device.startswith("CPU") or device.endswith("_Host"):
        return None
    m = re.search(r"(\d+)$", device)
    return int(m[1]) if m else None


# --- the parent side ---------------------------------------------------------------------------------

def measure(path: str | os.PathLike[str], params: FitParams,
            timeout_s: float = DRY_RUN_TIMEOUT_S) -> Breakdown:
    """The breakdown of one configuration as llama.cpp computes it on this machine's build."""
    return measure_many(path, [params], timeout_s)[0]


def measure_many(path: str | os.PathLike[str], configs: list[FitParams],
                 timeout_s: float = DRY_RUN_TIMEOUT_S) -> list[Breakdown]:
    """Several configurations of one model, the model loaded once per GPU layer count."""
    if any(p.cpu_moe or p.n_cpu_moe for p in configs):
        raise BadRequest("exact mode cannot keep experts in RAM: llama-cpp-python does not expose "
                         "llama.cpp's tensor buffer overrides; drop --exact or --cpu-moe")
    layout = ModelLayout.from_header(read_file(path))
    results: dict[int, Breakdown] = {}
    by_layers: dict[int, list[int]] = {}
    for i, p in enumerate(configs):
        by_layers.setdefault(layout.info.n_layer + 1 if p.gpu_layers is None else p.gpu_layers, []).append(i)
    for gpu_layers, indices in by_layers.items():
        request = {"path": str(Path(path).resolve()), "gpu_layers": gpu_layers,
                   "contexts": [_context_request(layout, configs[i]) for i in indices]}
        load_log, *context_logs = _run_child(request, timeout_s).split(CONTEXT_MARK)
        for i, log in zip(indices, context_logs, strict=True):
            results[i] = to_breakdown(layout, configs[i], parse_log(load_log + log))
    return [results[i] for i in range(len(configs))]


def _context_request(layout: ModelLayout, params: FitParams) -> dict[str, int]:
    att = resolve_attention(params, layout.info)
    return {
        "n_ctx": params.n_ctx or att.n_ctx, "n_ubatch": att.n_ubatch, "n_seq": att.n_seq,
        "n_batch": max(params.n_batch, att.n_ubatch),
        "type_k": KV_TYPE_IDS[att.type_k], "type_v": KV_TYPE_IDS[att.type_v],
        "flash_attn": FLASH_ATTN_IDS[params.flash_attn], "swa_full": int(params.swa_full),
    }


def refine(result: Plan, path: str | os.PathLike[str], timeout_s: float = DRY_RUN_TIMEOUT_S) -> Plan:
    """The plan with llama.cpp's own figures for the configuration it chose. The dry run uses this
    machine's llama.cpp build, so it cannot stand in for GPUs that are only imagined (`--gpu-mib`)."""
    bd = result.breakdown
    params = FitParams(n_ctx=bd.n_ctx, n_ubatch=bd.n_ubatch, kv_type_k=bd.kv_type_k, kv_type_v=bd.kv_type_v,
                       flash_attn="on" if bd.flash_attn else "off", gpu_layers=bd.gpu_layers,
                       n_cpu_moe=bd.n_cpu_moe)
    measured = measure(path, params, timeout_s)
    if len(measured.gpus) != len(bd.gpus):
        raise BadRequest(f"exact mode measures this machine's llama.cpp build, which offloads to "
                         f"{len(measured.gpus)} GPU(s), not the {len(bd.gpus)} planned for; "
                         "drop --exact to plan for other hardware")
    refined = replace(result, breakdown=measured, mode="exact", notes=list(result.notes))
    needs = [d.total_mib for d in measured.gpus] + [result.budget.ram_need(measured)]  # unified GPUs in RAM
    caps = [*result.budget.gpu_usable, result.budget.ram_usable]
    for dev, need, cap in zip(measured.devices, needs, caps, strict=True):
        if need > cap:
            refined.notes.append(f"llama.cpp's own figures need {need - cap:.0f} MiB more than "
                                 f"{dev.name} can give; lower the context or the GPU layers")
    refined.reason = explain(refined)
    return refined


def _run_child(request: dict[str, object], timeout_s: float) -> str:
    try:
        proc = subprocess.run([sys.executable, "-m", "bridge.fit_exact"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"llama.cpp's dry run did not finish within {timeout_s:.0f} s") from exc
    log = proc.stdout
    if proc.returncode != 0:
        tail = " / ".join(line.strip() for line in (log + proc.stderr).splitlines()[-4:] if line.strip())
        raise EngineError(f"llama.cpp's dry run failed (exit {proc.returncode}): {tail}")
    return log


def to_breakdown(layout: ModelLayout, params: FitParams, run: DryRun) -> Breakdown:
    """The analytic breakdown's shape, filled with llama.cpp's figures: its layer placement applied to the
    tensor table, its KV and compute sizes, and our own terms for what it does not log (CUDA context,
    vocabulary tables); the host keeps the analytic repack and residency rules."""
    backends = {*run.layer_device.values(), *run.compute_mib}
    gpu_names = sorted((d for d in backends if gpu_index(d) is not None), key=lambda d: gpu_index(d) or 0)
    ngl = sum(1 for d in run.layer_device.values() if gpu_index(d) is not None)
    flash = "on" if run.flash_attn else "off" if run.flash_attn is not None else params.flash_attn
    analytic = memory_breakdown(layout, replace(params, gpu_layers=ngl, flash_attn=flash),
                                [1.0] * len(gpu_names))
    gpus = [_gpu(layout, run, name, g) for g, name in enumerate(gpu_names)]
    host = _host(layout, run, analytic.host, params)
    return replace(analytic, gpus=gpus, host=host, gpu_layers=ngl if gpus else 0,
                   n_ctx=run.n_ctx or analytic.n_ctx, flash_attn=bool(run.flash_attn))


def _layer_bytes(layout: ModelLayout, il: int) -> int:
    if il == layout.info.n_layer:
        tied = layout.token_embd if layout.info.tied_output else 0
        return sum(m.nbytes for m in layout.output) + tied
    return sum(m.nbytes for m in layout.blocks[il])


def _gpu(layout: ModelLayout, run: DryRun, name: str, g: int) -> DeviceMemory:
    weights = sum(_layer_bytes(layout, il) for il, d in run.layer_device.items() if d == name)
    return DeviceMemory(f"GPU{g}", mib(weights), run.kv_mib.get(name, 0.0), run.compute_mib.get(name, 0.0),
                        float(CUDA_CONTEXT_MIB))


def _host(layout: ModelLayout, run: DryRun, analytic: HostMemory, params: FitParams) -> HostMemory:
    kv = sum(v for d, v in run.kv_mib.items() if gpu_index(d) is None)
    compute = sum(v for d, v in run.compute_mib.items() if gpu_index(d) is None)
    output = sum(run.output_mib.values())
    att = resolve_attention(params, layout.info)
    analytic_output = layout.info.n_vocab * 4.0 * att.n_seq
    overhead = mib(host_overhead_bytes(layout.info, att) - analytic_output) + output
    resident = (analytic.resident_mib - analytic.kv_mib - analytic.compute_mib - analytic.overhead_mib
                + kv + compute + overhead)
    return replace(analytic, kv_mib=kv, compute_mib=compute, overhead_mib=overhead, resident_mib=resident)


# --- the child side ----------------------------------------------------------------------------------

def _dry_run(request: dict[str, Any]) -> bool:
    """Runs in the child: load with no_alloc, then create each context, writing llama.cpp's log to
    stdout with a marker before each context's part. False when llama.cpp refuses."""
    import llama_cpp

    def on_log(_level: int, text: bytes | None, _user: object) -> None:
        if text:
            sys.stdout.write(text.decode("utf-8", errors="replace"))

    callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(callback, None)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.no_alloc = True
    mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # the mmap mode aborts with no_alloc
    mp.n_gpu_layers = int(request["gpu_layers"])
    model = llama_cpp.llama_model_load_from_file(str(request["path"]).encode(), mp)
    if not model:
        return False
    for settings in request["contexts"]:
        sys.stdout.write(CONTEXT_MARK)
        cp = llama_cpp.llama_context_default_params()
        for name in ("n_ctx", "n_batch", "n_ubatch"):
            setattr(cp, name, int(settings[name]))
        cp.n_seq_max = int(settings["n_seq"])
        cp.type_k, cp.type_v = int(settings["type_k"]), int(settings["type_v"])
        cp.flash_attn_type = int(settings["flash_attn"])
        cp.swa_full = bool(settings.get("swa_full", 0))  # the C API defaults to a full-size window cache
        ctx = llama_cpp.llama_init_from_model(model, cp)
        if not ctx:
            return False
        llama_cpp.llama_free(ctx)
    return True


def main() -> int:
    ok = _dry_run(json.loads(sys.stdin.read()))
    sys.stdout.flush()
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
