"""The planner against llama.cpp's own plans for three shapes on an H100, figure by figure.

Each row is what llama.cpp (the copy in llama-cpp-python 0.3.36, CUDA build) plans for one configuration of a
sparse file with the exact tensor table of a real model: a Llama-2-13B (no GQA, 32000-token vocabulary), a
Mixtral-8x7B (experts in VRAM, all in RAM with `--cpu-moe`, the first 16 layers' in RAM with `--n-cpu-moe 16`)
and a Llama-3.1-8B (128256-token vocabulary, ubatch and partial offload rows). Figures are MiB, `-` where
not measured; ngl 99 means every layer. `fit.memory_breakdown` must give each figure within 5% or 64 MiB:
one set of rules, not constants fitted per shape (other shapes are checked elsewhere).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.fit import Breakdown, FitParams, ModelLayout, memory_breakdown
from bridge.gguf import read_file

TOLERANCE_REL = 0.05
TOLERANCE_MIB = 64
GPU_FREE = [80000.0]  # one H100: its free memory decides nothing with one GPU
SHAPES = {"llama13b": "llama2-13b", "mixtral": "mixtral-8x7b", "llama8b": "llama31-8b"}

# shape settings | CUDA0 <weights> <KV> <compute>  Host <weights> <KV> <compute>
ROWS = """
llama13b c=4096 fa=on kv=f16 ngl=99 | CUDA0 6936 3200 115  Host 87 0 24
llama13b c=4096 fa=on kv=q8_0 ngl=99 | CUDA0 6936 1700 124  Host 87 0 24
llama13b c=4096 fa=off kv=f16 ngl=99 | CUDA0 6936 3200 388  Host 87 0 48
llama13b c=4096 fa=on kv=f16 ngl=13 | CUDA0 2170 960 126  Host 4853 2240 34
llama13b c=4096 fa=on kv=q8_0 ngl=13 | CUDA0 2170 510 180  Host 4853 1190 34
llama13b c=4096 fa=off kv=f16 ngl=13 | CUDA0 2170 960 444  Host 4853 2240 58
llama13b c=4096 fa=on kv=f16 ngl=27 | CUDA0 4553 2080 126  Host 2470 1120 34
llama13b c=4096 fa=on kv=q8_0 ngl=27 | CUDA0 4553 1105 180  Host 2470 595 34
llama13b c=4096 fa=off kv=f16 ngl=27 | CUDA0 4553 2080 444  Host 2470 1120 58
llama13b c=16384 fa=on kv=f16 ngl=99 | CUDA0 6936 12800 127  Host 87 0 36
llama13b c=16384 fa=on kv=q8_0 ngl=99 | CUDA0 6936 6800 376  Host 87 0 36
llama13b c=16384 fa=off kv=f16 ngl=99 | CUDA0 6936 12800 1372  Host 87 0 72
llama13b c=16384 fa=on kv=f16 ngl=13 | CUDA0 2170 3840 530  Host 4853 8960 46
llama13b c=16384 fa=on kv=q8_0 ngl=13 | CUDA0 2170 2040 564  Host 4853 4760 46
llama13b c=16384 fa=off kv=f16 ngl=13 | CUDA0 2170 3840 1666  Host 4853 8960 82
llama13b c=16384 fa=on kv=f16 ngl=27 | CUDA0 4553 8320 530  Host 2470 4480 46
llama13b c=16384 fa=on kv=q8_0 ngl=27 | CUDA0 4553 4420 564  Host 2470 2380 46
llama13b c=16384 fa=off kv=f16 ngl=27 | CUDA0 4553 8320 1666  Host 2470 4480 82
llama13b c=4096 fa=on kv=f16 ngl=30 | CUDA0 5063 2320 126  Host 1960 880 34
llama13b c=4096 fa=on kv=q8_0 ngl=30 | CUDA0 5063 1232 180  Host 1960 467 34
llama13b c=4096 fa=off kv=f16 ngl=30 | CUDA0 5063 2320 444  Host 1960 880 58
mixtral c=4096 fa=on kv=f16 ngl=99 | CUDA0 25019 512 196  Host 70 0 20
mixtral c=4096 fa=on kv=q8_0 ngl=99 | CUDA0 25019 272 196  Host 70 0 20
mixtral c=4096 fa=off kv=f16 ngl=99 | CUDA0 25019 512 300  Host 70 0 28
mixtral c=4096 fa=on kv=f16 ngl=11 | CUDA0 7889 160 401  Host 17200 352 20
mixtral c=4096 fa=on kv=q8_0 ngl=11 | CUDA0 7889 85 414  Host 17200 187 20
mixtral c=4096 fa=off kv=f16 ngl=11 | CUDA0 7889 160 397  Host 17200 352 28
mixtral c=4096 fa=on kv=f16 ngl=22 | CUDA0 16454 336 401  Host 8635 176 20
mixtral c=4096 fa=on kv=q8_0 ngl=22 | CUDA0 16454 178 414  Host 8635 93 20
mixtral c=4096 fa=off kv=f16 ngl=22 | CUDA0 16454 336 397  Host 8635 176 28
mixtral c=16384 fa=on kv=f16 ngl=99 | CUDA0 25019 2048 208  Host 70 0 32
mixtral c=16384 fa=on kv=q8_0 ngl=99 | CUDA0 25019 1088 208  Host 70 0 32
mixtral c=16384 fa=off kv=f16 ngl=99 | CUDA0 25019 2048 1092  Host 70 0 52
mixtral c=16384 fa=on kv=f16 ngl=11 | CUDA0 7889 640 413  Host 17200 1408 32
mixtral c=16384 fa=on kv=q8_0 ngl=11 | CUDA0 7889 340 447  Host 17200 748 32
mixtral c=16384 fa=off kv=f16 ngl=11 | CUDA0 7889 640 1145  Host 17200 1408 52
mixtral c=16384 fa=on kv=f16 ngl=22 | CUDA0 16454 1344 413  Host 8635 704 32
mixtral c=16384 fa=on kv=q8_0 ngl=22 | CUDA0 16454 714 447  Host 8635 374 32
mixtral c=16384 fa=off kv=f16 ngl=22 | CUDA0 16454 1344 1145  Host 8635 704 52
mixtral c=32768 fa=on kv=f16 ngl=99 | CUDA0 25019 4096 224  Host 70 0 48
mixtral c=32768 fa=on kv=q8_0 ngl=99 | CUDA0 25019 2176 224  Host 70 0 48
mixtral c=32768 fa=off kv=f16 ngl=99 | CUDA0 25019 4096 2148  Host 70 0 84
mixtral c=32768 fa=on kv=f16 ngl=11 | CUDA0 7889 1280 493  Host 17200 2816 48
mixtral c=32768 fa=on kv=q8_0 ngl=11 | CUDA0 7889 680 441  Host 17200 1496 48
mixtral c=32768 fa=off kv=f16 ngl=11 | CUDA0 7889 1280 2265  Host 17200 2816 84
mixtral c=32768 fa=on kv=f16 ngl=22 | CUDA0 16454 2688 493  Host 8635 1408 48
mixtral c=32768 fa=on kv=q8_0 ngl=22 | CUDA0 16454 1428 441  Host 8635 748 48
mixtral c=32768 fa=off kv=f16 ngl=22 | CUDA0 16454 2688 2265  Host 8635 1408 84
mixtral c=4096 fa=on kv=f16 ngl=99 cpu-moe | CUDA0 827 512 392  Host 24262 0 20
mixtral c=4096 fa=on kv=f16 ngl=99 n-cpu-moe=16 | CUDA0 12923 512 392  Host 12166 0 20
mixtral c=4096 fa=on kv=q8_0 ngl=99 cpu-moe | CUDA0 827 272 392  Host 24262 0 20
mixtral c=4096 fa=on kv=q8_0 ngl=99 n-cpu-moe=16 | CUDA0 12923 272 392  Host 12166 0 20
mixtral c=4096 fa=off kv=f16 ngl=99 cpu-moe | CUDA0 827 512 392  Host 24262 0 28
mixtral c=4096 fa=off kv=f16 ngl=99 n-cpu-moe=16 | CUDA0 12923 512 392  Host 12166 0 28
mixtral c=16384 fa=on kv=f16 ngl=99 cpu-moe | CUDA0 827 2048 404  Host 24262 0 32
mixtral c=16384 fa=on kv=f16 ngl=99 n-cpu-moe=16 | CUDA0 12923 2048 404  Host 12166 0 32
mixtral c=16384 fa=on kv=q8_0 ngl=99 cpu-moe | CUDA0 827 1088 404  Host 24262 0 32
mixtral c=16384 fa=on kv=q8_0 ngl=99 n-cpu-moe=16 | CUDA0 12923 1088 404  Host 12166 0 32
mixtral c=16384 fa=off kv=f16 ngl=99 cpu-moe | CUDA0 827 2048 1092  Host 24262 0 52
mixtral c=16384 fa=off kv=f16 ngl=99 n-cpu-moe=16 | CUDA0 12923 2048 1092  Host 12166 0 52
mixtral c=32768 fa=on kv=f16 ngl=99 cpu-moe | CUDA0 827 4096 420  Host 24262 0 48
mixtral c=32768 fa=on kv=f16 ngl=99 n-cpu-moe=16 | CUDA0 12923 4096 420  Host 12166 0 48
mixtral c=32768 fa=on kv=q8_0 ngl=99 cpu-moe | CUDA0 827 2176 420  Host 24262 0 48
mixtral c=32768 fa=on kv=q8_0 ngl=99 n-cpu-moe=16 | CUDA0 12923 2176 420  Host 12166 0 48
mixtral c=32768 fa=off kv=f16 ngl=99 cpu-moe | CUDA0 827 4096 2148  Host 24262 0 84
mixtral c=32768 fa=off kv=f16 ngl=99 n-cpu-moe=16 | CUDA0 12923 4096 2148  Host 12166 0 84
llama13b c=4096 fa=on kv=f16 ngl=0 | CUDA0 0 0 200  Host 7023 3200 34
mixtral c=4096 fa=on kv=f16 ngl=0 | CUDA0 0 0 401  Host 25089 512 20
llama8b c=4096 fa=on kv=f16 ngl=99 | CUDA0 4155 512 258  Host 281 - 20
llama8b c=4096 fa=on kv=q8_0 ngl=99 | CUDA0 4155 272 258  Host 281 - 20
llama8b c=4096 fa=on kv=q4_0 ngl=99 | CUDA0 4155 144 258  Host 281 - 20
llama8b c=4096 fa=off kv=f16 ngl=99 | CUDA0 4155 512 300  Host 281 - 28
llama8b c=8192 fa=on kv=f16 ngl=99 | CUDA0 4155 1024 258  Host 281 - 24
llama8b c=8192 fa=off kv=f16 ngl=99 | CUDA0 4155 1024 564  Host 281 - 36
llama8b c=32768 fa=on kv=f16 ngl=99 | CUDA0 4155 4096 258  Host 281 - 48
llama8b c=32768 fa=on kv=q8_0 ngl=99 | CUDA0 4155 2176 258  Host 281 - 48
llama8b c=32768 fa=on kv=q4_0 ngl=99 | CUDA0 4155 1152 258  Host 281 - 48
llama8b c=32768 fa=off kv=f16 ngl=99 | CUDA0 4155 4096 2148  Host 281 - 84
llama8b c=32768 fa=off kv=q8_0/f16 ngl=99 | CUDA0 4155 3136 2140  Host 281 - -
llama8b c=131072 fa=on kv=f16 ngl=99 | CUDA0 4155 16384 258  Host 281 - 144
llama8b c=131072 fa=on kv=q8_0 ngl=99 | CUDA0 4155 8704 672  Host 281 - 144
llama8b c=131072 fa=on kv=q4_0 ngl=99 | CUDA0 4155 4608 672  Host 281 - 144
llama8b c=131072 fa=off kv=f16 ngl=99 | CUDA0 4155 16384 8484  Host 281 - 276
llama8b c=32768 fa=on kv=f16 ngl=99 ub=128 | CUDA0 4155 4096 64  Host 281 - -
llama8b c=32768 fa=on kv=f16 ngl=99 ub=1024 | CUDA0 4155 4096 517  Host 281 - -
llama8b c=32768 fa=on kv=f16 ngl=99 ub=2048 | CUDA0 4155 4096 1034  Host 281 - -
llama8b c=32768 fa=off kv=f16 ngl=99 ub=128 | CUDA0 4155 4096 537  Host 281 - -
llama8b c=32768 fa=off kv=f16 ngl=99 ub=1024 | CUDA0 4155 4096 4296  Host 281 - -
llama8b c=32768 fa=off kv=f16 ngl=99 ub=2048 | CUDA0 4155 4096 8592  Host 281 - -
llama8b c=8192 fa=on kv=f16 ngl=0 | CUDA0 0 0 669  Host 4437 1024 -
llama8b c=8192 fa=off kv=f16 ngl=0 | CUDA0 0 0 669  Host 4437 1024 -
llama8b c=8192 fa=on kv=f16 ngl=8 | CUDA0 1230 224 258  Host - - -
llama8b c=8192 fa=off kv=f16 ngl=8 | CUDA0 1230 224 585  Host - - -
llama8b c=8192 fa=on kv=f16 ngl=16 | CUDA0 2166 480 258  Host 2271 544 -
llama8b c=8192 fa=off kv=f16 ngl=16 | CUDA0 2166 480 585  Host 2271 544 -
llama8b c=8192 fa=on kv=f16 ngl=24 | CUDA0 3102 736 -  Host - - -
llama8b c=8192 fa=on kv=f16 ngl=32 | CUDA0 4038 992 -  Host - - -
llama8b c=8192 fa=on kv=f16 ngl=33 | CUDA0 4155 1024 258  Host - - -
llama8b c=8192 fa=off kv=f16 ngl=33 | CUDA0 4155 1024 564  Host - - -
"""

LINE = re.compile(r"(\w+) (.+?) \| CUDA0 (\S+) (\S+) (\S+) +Host (\S+) (\S+) (\S+)$")
FIGURES = ("GPU weights", "GPU KV", "GPU compute", "host weights", "host KV", "host compute")


def _params(settings: str) -> FitParams:
    s = dict(kv.split("=", 1) if "=" in kv else (kv, "1") for kv in settings.split())
    type_k, _, type_v = s["kv"].partition("/")
    return FitParams(n_ctx=int(s["c"]), n_ubatch=int(s.get("ub", 512)), kv_type_k=type_k,
                     kv_type_v=type_v or type_k, flash_attn=s["fa"], gpu_layers=int(s["ngl"]),
                     cpu_moe="cpu-moe" in s, n_cpu_moe=int(s.get("n-cpu-moe", 0)))


def _rows() -> list[tuple[str, str, dict[str, float]]]:
    rows = []
    for line in ROWS.strip().splitlines():
        m = LINE.match(line)
        assert m, line
        shape, settings, *figures = m.groups()
        expected = {k: float(v) for k, v in zip(FIGURES, figures, strict=True) if v != "-"}
        rows.append((shape, settings, expected))
    return rows


def _figures(bd: Breakdown) -> dict[str, float]:
    gpu, host = bd.gpus[0], bd.host
    return {"GPU weights": gpu.weights_mib, "GPU KV": gpu.kv_mib, "GPU compute": gpu.compute_mib,
            "host weights": host.weights_mib, "host KV": host.kv_mib, "host compute": host.compute_mib}


def _allowed(want: float) -> float:
    return max(TOLERANCE_MIB, TOLERANCE_REL * want)


@pytest.fixture(scope="module")
def layouts(sparse_model):
    cache: dict[str, ModelLayout] = {}

    def get(shape: str) -> ModelLayout:
        if shape not in cache:
            cache[shape] = ModelLayout.from_header(read_file(Path(sparse_model(SHAPES[shape]))))
        return cache[shape]

    return get


@pytest.mark.parametrize(("shape", "settings", "expected"),
                         [pytest.param(*row, id=f"{row[0]} {row[1]}") for row in _rows()])
def test_row(layouts, shape: str, settings: str, expected: dict[str, float]) -> None:
    got = _figures(memory_breakdown(layouts(shape), _params(settings), GPU_FREE))
    misses = {k: round(got[k] - want, 1) for k, want in expected.items()
              if abs(got[k] - want) > _allowed(want)}
    assert not misses, f"planned minus measured, MiB: {misses}"


def test_largest_miss_per_figure(layouts) -> None:
    """Prints the largest miss of each figure over all rows (run with -s to see it)."""
    worst: dict[str, tuple[float, float, str]] = {}
    for shape, settings, expected in _rows():
        got = _figures(memory_breakdown(layouts(shape), _params(settings), GPU_FREE))
        for k, want in expected.items():
            miss = got[k] - want
            if abs(miss) >= abs(worst.get(k, (0.0, 0.0, ""))[0]):
                worst[k] = (miss, want, f"{shape} {settings}: {got[k]:.1f} planned, {want:.0f} measured")
    for k in FIGURES:
        print(f"largest miss, {k}: {worst[k][0]:+.1f} MiB ({worst[k][2]})")
    assert all(abs(miss) <= _allowed(want) for miss, want, _ in worst.values())
