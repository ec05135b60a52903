"""`st-bridge fit --json` against llama.cpp's own figures for Llama-3.1-8B on an H100.

Every row of the measured table (fit-reference section 1.3: llama.cpp from the llama-cpp-python 0.3.36
sdist, CUDA 13, `no_alloc` dry runs confirmed by real loads) must come out of the planner within 3% or
32 MiB, for the sparse file with the exact tensor table of that model. The figures are MiB.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.cli import main

TOLERANCE_REL = 0.03
TOLERANCE_MIB = 32
GPU_WEIGHTS, HOST_WEIGHTS = 4155, 281  # full offload: everything but the token embedding on the GPU


def _row(ctx: int, fa: str, kv: str, *, kv_mib: float, gpu_compute: float, host_compute: float | None = None,
         ubatch: int = 512, kv_k: str | None = None) -> pytest.param:
    flags = ["--ctx", str(ctx), "--flash-attn", fa, "--ubatch", str(ubatch)]
    flags += ["--kv-type-k", kv_k, "--kv-type-v", kv] if kv_k else ["--kv-type", kv]
    expected = {("GPU0", "weights_mib"): GPU_WEIGHTS, ("GPU0", "kv_mib"): kv_mib,
                ("GPU0", "compute_mib"): gpu_compute, ("host", "weights_mib"): HOST_WEIGHTS}
    if host_compute is not None:
        expected[("host", "compute_mib")] = host_compute
    name = f"ctx{ctx}-fa_{fa}-{kv_k + '/' if kv_k else ''}{kv}-ub{ubatch}"
    return pytest.param(flags, expected, id=name)


def _partial(ngl: int, fa: str, gpu: tuple[float, float, float | None],
             host: tuple[float, float] | None = None) -> pytest.param:
    flags = ["--ctx", "8192", "--flash-attn", fa, "--kv-type", "f16", "--gpu-layers", str(ngl)]
    weights, kv, compute = gpu
    expected = {("GPU0", "weights_mib"): weights, ("GPU0", "kv_mib"): kv}
    if compute is not None:
        expected[("GPU0", "compute_mib")] = compute
    if host:
        expected[("host", "weights_mib")], expected[("host", "kv_mib")] = host
    return pytest.param(flags, expected, id=f"ngl{ngl}-fa_{fa}")


FULL_OFFLOAD = [
    _row(4096, "on", "f16", kv_mib=512, gpu_compute=258, host_compute=20),
    _row(4096, "on", "q8_0", kv_mib=272, gpu_compute=258, host_compute=20),
    _row(4096, "on", "q4_0", kv_mib=144, gpu_compute=258, host_compute=20),
    _row(4096, "off", "f16", kv_mib=512, gpu_compute=300, host_compute=28),
    _row(8192, "on", "f16", kv_mib=1024, gpu_compute=258, host_compute=24),
    _row(8192, "off", "f16", kv_mib=1024, gpu_compute=564, host_compute=36),
    _row(32768, "on", "f16", kv_mib=4096, gpu_compute=258, host_compute=48),
    _row(32768, "on", "q8_0", kv_mib=2176, gpu_compute=258, host_compute=48),
    _row(32768, "on", "q4_0", kv_mib=1152, gpu_compute=258, host_compute=48),
    _row(32768, "off", "f16", kv_mib=4096, gpu_compute=2148, host_compute=84),
    _row(32768, "off", "f16", kv_k="q8_0", kv_mib=3136, gpu_compute=2140),
    _row(131072, "on", "f16", kv_mib=16384, gpu_compute=258, host_compute=144),
    _row(131072, "on", "q8_0", kv_mib=8704, gpu_compute=672, host_compute=144),
    _row(131072, "on", "q4_0", kv_mib=4608, gpu_compute=672, host_compute=144),
    _row(131072, "off", "f16", kv_mib=16384, gpu_compute=8484, host_compute=276),
]

UBATCH = [
    _row(32768, "on", "f16", ubatch=128, kv_mib=4096, gpu_compute=64),
    _row(32768, "on", "f16", ubatch=1024, kv_mib=4096, gpu_compute=517),
    _row(32768, "on", "f16", ubatch=2048, kv_mib=4096, gpu_compute=1034),
    _row(32768, "off", "f16", ubatch=128, kv_mib=4096, gpu_compute=537),
    _row(32768, "off", "f16", ubatch=1024, kv_mib=4096, gpu_compute=4296),
    _row(32768, "off", "f16", ubatch=2048, kv_mib=4096, gpu_compute=8592),
]

PARTIAL = [
    _partial(0, "on", (0, 0, 669), (4437, 1024)),
    _partial(0, "off", (0, 0, 669), (4437, 1024)),
    _partial(8, "on", (1230, 224, 258)),
    _partial(8, "off", (1230, 224, 585)),
    _partial(16, "on", (2166, 480, 258), (2271, 544)),
    _partial(16, "off", (2166, 480, 585), (2271, 544)),
    _partial(24, "on", (3102, 736, None)),
    _partial(32, "on", (4038, 992, None)),
    _partial(33, "on", (4155, 1024, 258)),
    _partial(33, "off", (4155, 1024, 564)),
]


def _fit_json(path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    # 64 GB of RAM: the breakdown must not depend on this machine's memory.
    assert main(["fit", str(path), "--json", "--gpu-mib", "81000", "--ram-mib", "64000", *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("flags", "expected"), FULL_OFFLOAD + UBATCH + PARTIAL)
def test_h100_row(llama8b_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                  expected: dict[tuple[str, str], float]) -> None:
    plan = _fit_json(llama8b_path, flags, capsys)
    devices = {d["name"]: d for d in plan["devices"]}
    for (device, field), want in expected.items():
        got = devices[device][field]
        allowed = max(TOLERANCE_MIB, TOLERANCE_REL * want)
        assert abs(got - want) <= allowed, f"{device} {field}: {got} vs {want}"


def test_the_cuda_context_is_counted_on_the_gpu(llama8b_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """nvidia-smi shows 592-686 MiB per process beyond llama.cpp's buffers (section 1.3)."""
    plan = _fit_json(llama8b_path, ["--ctx", "8192"], capsys)
    assert 590 <= plan["devices"][0]["overhead_mib"] <= 690
