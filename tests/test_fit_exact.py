"""Exact mode: llama.cpp's own dry run (no_alloc, in a child process) agrees with the analytic planner.

On this CPU machine llama.cpp reports the KV cache and the CPU compute buffer; both modes must agree
within a few percent for every model llama.cpp can load: the tiny ladder, the ~1B model and the sparse
files of real architectures (with no_alloc their zero data is never read).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.errors import BadRequest, EngineError
from bridge.fit import DeviceMemory, FitParams, ModelLayout, memory_breakdown
from bridge.fit_exact import measure, measure_many, parse_log
from bridge.gguf import read_file
from tests.fixtures.sparse_models import MISTRAL_7B, write_sparse_model

SETTINGS = [
    FitParams(n_ctx=4096, flash_attn="on"),
    FitParams(n_ctx=8192, flash_attn="off"),
    FitParams(n_ctx=32768, flash_attn="auto", kv_type_k="q8_0"),
    FitParams(n_ctx=2048, n_ubatch=128, flash_attn="on", kv_type_k="q4_0"),
]
SPARSE_LOADABLE = ["llama31-8b", "mistral-7b", "mixtral-8x7b", "gemma2-9b"]
# The README's figures: measured worst cases 0.45% (KV, tiny model, q4_0), 1.36% (compute, Gemma-2 at 8192
# without flash attention) and 0.14% (the sum).
KV_REL, COMPUTE_REL, TOTAL_REL = 0.006, 0.015, 0.002


def _agree(path: Path, settings: list[FitParams]) -> None:
    layout = ModelLayout.from_header(read_file(path))
    for params, exact in zip(settings, measure_many(path, settings), strict=True):
        analytic = memory_breakdown(layout, params, ()).host
        assert exact.host.kv_mib == pytest.approx(analytic.kv_mib, rel=KV_REL), params
        assert exact.host.compute_mib == pytest.approx(analytic.compute_mib, rel=COMPUTE_REL), params
        assert exact.host.weights_mib == pytest.approx(analytic.weights_mib, rel=1e-6), params
        assert _sum(exact.host) == pytest.approx(_sum(analytic), rel=TOTAL_REL), params


def _sum(memory: DeviceMemory) -> float:
    return memory.weights_mib + memory.kv_mib + memory.compute_mib


@pytest.mark.parametrize("key", SPARSE_LOADABLE)
def test_sparse_models_agree(sparse_model, key: str) -> None:
    _agree(sparse_model(key), SETTINGS)


def test_sliding_window_cache_agrees_windowed_and_full(sparse_model) -> None:
    """Gemma-2's sliding-window layers keep the window plus a ubatch unless the full cache is asked for."""
    path = sparse_model("gemma2-9b")
    for full in (False, True):
        params = FitParams(n_ctx=8192, swa_full=full)
        exact, planned = measure(path, params), memory_breakdown(read_file(path), params)
        assert exact.host.kv_mib == pytest.approx(planned.host.kv_mib, rel=0.01)
    windowed = measure(path, FitParams(n_ctx=8192)).host.kv_mib
    assert windowed < measure(path, FitParams(n_ctx=8192, swa_full=True)).host.kv_mib * 0.8


def test_tiny_and_1b_models_agree(tiny_model: Path, model_1b: Path) -> None:
    _agree(tiny_model, SETTINGS)
    _agree(model_1b, SETTINGS)


def test_one_configuration_at_a_time(tiny_model: Path) -> None:
    exact = measure(tiny_model, FitParams(n_ctx=1024, flash_attn="on"))
    assert exact.n_ctx == 1024 and exact.flash_attn
    assert exact.gpus == [] and exact.host.kv_mib > 0


def test_cli_exact_mode_reports_llama_cpp_figures(llama8b_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", str(llama8b_path), "--exact", "--json", "--gpu-mib", "0", "--ctx", "8192",
                 "--flash-attn", "off", "--ram-mib", "64000"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mode"] == "exact"
    assert [d["name"] for d in plan["devices"]] == ["host"]
    assert plan["devices"][0]["kv_mib"] == 1024.0
    assert plan["devices"][0]["compute_mib"] == pytest.approx(572.01, abs=0.1)


def test_exact_mode_cannot_measure_imagined_gpus(llama8b_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """This machine's llama.cpp has no GPU backend: a what-if GPU cannot be measured, and it says so."""
    assert main(["fit", str(llama8b_path), "--exact", "--gpu-mib", "24000"]) == 2
    assert "exact mode measures this machine's llama.cpp build" in capsys.readouterr().err


def test_experts_in_ram_cannot_be_measured(sparse_model) -> None:
    with pytest.raises(BadRequest, match="tensor buffer overrides"):
        measure(sparse_model("mixtral-8x7b"), FitParams(cpu_moe=True))


def test_a_file_llama_cpp_refuses_is_a_clear_error(tmp_path: Path) -> None:
    """An architecture llama.cpp does not know: the dry run fails in its child, and the error carries
    llama.cpp's own words instead of taking this process down."""
    path = write_sparse_model(tmp_path / "odd.gguf", replace(MISTRAL_7B, arch="no-such-arch", n_layer=2))
    with pytest.raises(EngineError, match=r"dry run failed .*no-such-arch"):
        measure(path, FitParams(n_ctx=4096))


def test_the_log_parser_shares_kv_over_devices_and_sums_backends() -> None:
    log = "\n".join([
        "load_tensors: layer   0 assigned to device CPU, is_swa = 0",
        "load_tensors: layer   1 assigned to device CUDA0, is_swa = 0",
        "load_tensors: layer   2 assigned to device CUDA0, is_swa = 0",
        "llama_context: n_ctx                 = 4096",
        "llama_context: flash_attn            = auto",
        "llama_context:  CUDA_Host  output buffer size =     0.49 MiB",
        "llama_kv_cache: layer   0: dev = CPU",
        "llama_kv_cache: layer   1: dev = CUDA0",
        "llama_kv_cache: size =  256.00 MiB (  4096 cells,   2 layers,  1/1 seqs), K (f16): 128.00 MiB",
        "resolve_fused_ops: Flash Attention enabled",
        "sched_reserve:      CUDA0 compute buffer size =   258.50 MiB",
        "sched_reserve:  CUDA_Host compute buffer size =    20.01 MiB",
    ])
    run = parse_log(log)
    assert run.layer_device == {0: "CPU", 1: "CUDA0", 2: "CUDA0"}
    assert run.kv_mib == {"CPU": 128.0, "CUDA0": 128.0}
    assert run.compute_mib == {"CUDA0": 258.5, "CUDA_Host": 20.01}
    assert run.n_ctx == 4096 and run.flash_attn is True
