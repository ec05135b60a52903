"""The planner's rules on other shapes than the calibration model, its search and its verdicts.

Every model here is a sparse file with the exact tensor table of a real architecture; the hardware is a
`HardwareReport` built as the probe would build it for that machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.errors import BadRequest
from bridge.fit import (
    CUDA_CONTEXT_MIB,
    FitParams,
    ModelLayout,
    memory_breakdown,
    plan,
)
from bridge.gguf import read_file
from bridge.hardware import CPUInfo, GPUInfo, HardwareReport

MIB = 1 << 20


@pytest.fixture(scope="module")
def layouts(sparse_model):
    cache: dict[str, ModelLayout] = {}

    def get(key: str) -> ModelLayout:
        if key not in cache:
            cache[key] = ModelLayout.from_header(read_file(sparse_model(key)))
        return cache[key]

    return get


def machine(*gpus: tuple[str, int], ram_mib: int = 64000) -> HardwareReport:
    cpu = CPUInfo(model="test CPU", cores_physical=8, cores_logical=16, avx2=True, avx512=False)
    found = [GPUInfo(index=i, name=name, total_mib=mib, free_mib=mib, used_mib=0) for i, (name, mib) in
             enumerate(gpus)]
    return HardwareReport(cpu=cpu, ram_total_mib=ram_mib, ram_available_mib=ram_mib, swap_total_mib=0,
                          swap_free_mib=0, gpus=found, gpu_offload_supported=bool(gpus))


def fit_json(path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    assert main(["fit", str(path), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


# --- KV cache rules ----------------------------------------------------------------------------------

def test_context_is_padded_to_256(layouts) -> None:
    bd = memory_breakdown(layouts("llama31-8b"), FitParams(n_ctx=1000), [81000])
    assert bd.n_ctx == 1024
    assert bd.gpus[0].kv_mib == 32 * 1024 * 2048 * 2 / MIB


@pytest.mark.parametrize(("kv", "bytes_per_elt"), [("f16", 2), ("q8_0", 34 / 32), ("q4_0", 18 / 32)])
def test_quantized_kv_uses_block_sizes_not_round_bits(layouts, kv: str, bytes_per_elt: float) -> None:
    bd = memory_breakdown(layouts("mistral-7b"), FitParams(n_ctx=8192, kv_type_k=kv), [81000])
    assert bd.gpus[0].kv_mib == pytest.approx(32 * 8192 * 2048 * bytes_per_elt / MIB)


def test_sliding_window_layers_keep_window_plus_ubatch(layouts) -> None:
    """Gemma-2 alternates 4096-token sliding-window layers with global ones: 21 + 21 of 42."""
    per_cell = 2 * 8 * 256 * 2  # K and V, 8 KV heads of 256, f16
    bd = memory_breakdown(layouts("gemma2-9b"), FitParams(n_ctx=8192), [81000])
    assert bd.gpus[0].kv_mib == pytest.approx(21 * (4096 + 512 + 8192) * per_cell / MIB)
    full = memory_breakdown(layouts("gemma2-9b"), FitParams(n_ctx=8192, swa_full=True), [81000])
    assert full.gpus[0].kv_mib == pytest.approx(42 * 8192 * per_cell / MIB)
    short = memory_breakdown(layouts("gemma2-9b"), FitParams(n_ctx=2048), [81000])
    assert short.gpus[0].kv_mib == pytest.approx(42 * 2048 * per_cell / MIB)


def test_mla_caches_only_the_latent(layouts) -> None:
    """DeepSeek-V2-Lite: 512 latent + 64 rope elements per token and layer, K only."""
    bd = memory_breakdown(layouts("deepseek-v2-lite"), FitParams(n_ctx=4096), [81000])
    assert bd.gpus[0].kv_mib == pytest.approx(27 * 4096 * 576 * 2 / MIB)
    with pytest.raises(BadRequest, match="same type for the K and V"):
        memory_breakdown(layouts("deepseek-v2-lite"), FitParams(kv_type_k="q8_0", kv_type_v="f16"), [81000])


def test_quantized_v_forces_flash_attention(layouts, llama8b_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    auto = memory_breakdown(layouts("llama31-8b"), FitParams(kv_type_k="q8_0", flash_attn="auto"), [81000])
    assert auto.flash_attn
    k_only = memory_breakdown(layouts("llama31-8b"), FitParams(kv_type_k="q8_0", kv_type_v="f16",
                                                                flash_attn="off"), [81000])
    assert not k_only.flash_attn
    assert main(["fit", str(llama8b_path), "--kv-type", "q4_0", "--flash-attn", "off", "--gpu-mib", "0"]) == 2
    assert "q4_0 V cache needs flash attention" in capsys.readouterr().err


def test_flash_attention_off_grows_compute_with_context(layouts) -> None:
    def compute(ctx: int, fa: str) -> float:
        bd = memory_breakdown(layouts("mistral-7b"), FitParams(n_ctx=ctx, flash_attn=fa), [81000])
        return bd.gpus[0].compute_mib

    # With flash attention only the f16 KQ mask grows with the context (fit-reference 9: Mixtral's GPU
    # compute 196, 208, 224 MiB at 4k, 16k, 32k); without it the KQ scores do.
    mask_growth = (32768 - 8192) * 512 * 2 / 2**20
    assert compute(32768, "on") - compute(8192, "on") == pytest.approx(mask_growth, abs=1)
    assert compute(32768, "off") > 3 * compute(8192, "off")


# --- placement -----------------------------------------------------------------------------------------

def test_gpu_layers_count_the_output_layer(layouts) -> None:
    layout = layouts("llama31-8b")
    block = sum(m.nbytes for m in layout.blocks[0]) / MIB
    output = sum(m.nbytes for m in layout.output) / MIB

    def gpu(ngl: int):
        return memory_breakdown(layout, FitParams(n_ctx=4096, gpu_layers=ngl), [81000]).gpus[0]

    assert gpu(1).weights_mib == pytest.approx(output) and gpu(1).kv_mib == 0
    assert gpu(16).weights_mib == pytest.approx(output + 15 * block)
    assert gpu(16).kv_mib == 15 * 4096 * 2048 * 2 / MIB
    zero = gpu(0)
    assert zero.weights_mib == 0 and zero.kv_mib == 0
    assert zero.compute_mib > 600 and zero.overhead_mib == CUDA_CONTEXT_MIB  # the GPU is still used


def test_token_embedding_stays_on_the_host_and_tied_output_copies_it(layouts) -> None:
    gemma = layouts("gemma2-9b")
    bd = memory_breakdown(gemma, FitParams(n_ctx=4096), [81000])
    assert bd.host.weights_mib * MIB >= gemma.token_embd
    blocks = sum(m.nbytes for b in gemma.blocks for m in b) + sum(m.nbytes for m in gemma.output)
    assert bd.gpus[0].weights_mib * MIB == pytest.approx(blocks + gemma.token_embd)


def test_two_gpus_split_layers_by_free_memory(layouts) -> None:
    layout = layouts("llama31-8b")
    even = memory_breakdown(layout, FitParams(n_ctx=4096), [12000, 12000])
    one = memory_breakdown(layout, FitParams(n_ctx=4096), [24000])
    assert sum(g.weights_mib for g in even.gpus) == pytest.approx(one.gpus[0].weights_mib)
    assert even.gpus[0].kv_mib == 17 * 4096 * 2048 * 2 / MIB  # blocks 0-16; the rest and the output on GPU1
    uneven = memory_breakdown(layout, FitParams(n_ctx=4096), [24000, 8000])
    assert uneven.gpus[0].kv_mib == 25 * 4096 * 2048 * 2 / MIB
    assert uneven.gpus[1].compute_mib > uneven.gpus[0].compute_mib  # the logits live with the output


def test_experts_in_ram_leave_the_dense_part_on_the_gpu(layouts) -> None:
    mixtral = layouts("mixtral-8x7b")
    all_gpu = memory_breakdown(mixtral, FitParams(n_ctx=4096), [81000])
    cpu_moe = memory_breakdown(mixtral, FitParams(n_ctx=4096, cpu_moe=True), [81000])
    assert cpu_moe.gpu_layers == 33 and cpu_moe.n_cpu_moe == 32
    assert cpu_moe.gpus[0].weights_mib < 0.1 * all_gpu.gpus[0].weights_mib
    assert cpu_moe.gpus[0].kv_mib == all_gpu.gpus[0].kv_mib
    assert cpu_moe.host.weights_mib > 0.9 * all_gpu.gpus[0].weights_mib
    weights = [memory_breakdown(mixtral, FitParams(n_ctx=4096, n_cpu_moe=n), [81000]).gpus[0].weights_mib
               for n in (0, 8, 16, 32)]
    assert weights == sorted(weights, reverse=True)


def test_repacked_matrices_move_to_anonymous_memory_on_avx2(layouts) -> None:
    layout = layouts("llama31-8b")
    avx2 = memory_breakdown(layout, FitParams(n_ctx=4096), (), cpu_repack=True).host
    plain = memory_breakdown(layout, FitParams(n_ctx=4096), (), cpu_repack=False).host
    assert avx2.repack_mib > 3000 and plain.repack_mib == 0
    assert avx2.weights_mib == plain.weights_mib
    assert avx2.resident_mib == pytest.approx(plain.resident_mib)  # a copy replaces its file pages


# --- the search and the verdicts ---------------------------------------------------------------------

def test_fits_fully_and_says_so_with_the_gpu_name(layouts) -> None:
    p = plan(layouts("llama31-8b"), machine(("NVIDIA GeForce RTX 3080", 10240)), FitParams(n_ctx=8192))
    assert p.verdict == "full_gpu" and p.breakdown.gpu_layers == 33
    assert p.reason.startswith("fits fully on your RTX 3080 (10 GB) at 8192 tokens of context,")
    assert p.reason.endswith("GB to spare")


def test_q8_0_cache_is_tried_when_only_it_makes_everything_fit(layouts) -> None:
    p = plan(layouts("llama31-8b"), machine(("GPU", 6500)), FitParams(n_ctx=8192))
    assert p.verdict == "full_gpu" and p.breakdown.kv_type_k == "q8_0" and p.breakdown.flash_attn
    assert "q8_0" in p.reason
    fixed = plan(layouts("llama31-8b"), machine(("GPU", 6500)), FitParams(n_ctx=8192, kv_type_k="f16"))
    assert fixed.verdict == "partial_gpu" and fixed.breakdown.kv_type_k == "f16"


def test_partial_offload_puts_the_most_layers_that_fit(layouts) -> None:
    layout = layouts("llama31-8b")
    p = plan(layout, machine(("GPU", 4096)), FitParams(n_ctx=8192, kv_type_k="f16"))
    assert p.verdict == "partial_gpu"
    ngl = p.breakdown.gpu_layers
    budget = 4096 - 512
    assert p.breakdown.gpus[0].total_mib <= budget
    more = memory_breakdown(layout, FitParams(n_ctx=8192, kv_type_k="f16", gpu_layers=ngl + 1), [4096])
    assert more.gpus[0].total_mib > budget
    assert f"{ngl} of 33 layers on the GPU" in p.reason


def test_moe_prefers_experts_in_ram_over_fewer_layers(layouts) -> None:
    p = plan(layouts("mixtral-8x7b"), machine(("RTX 4070", 12288)), FitParams(n_ctx=8192))
    assert p.verdict == "partial_gpu"
    assert p.breakdown.gpu_layers == 33 and 0 < p.breakdown.n_cpu_moe < 32
    assert "experts" in p.reason


def test_cpu_only_and_wont_fit(layouts) -> None:
    cpu = plan(layouts("llama31-8b"), machine(ram_mib=16000), FitParams(n_ctx=8192))
    assert cpu.verdict == "cpu_only" and cpu.breakdown.gpus == []
    assert "no usable GPU" in cpu.reason
    tight = plan(layouts("llama31-8b"), machine(ram_mib=5600), FitParams(n_ctx=131072))
    assert tight.verdict == "wont_fit"
    assert tight.reason.startswith("does not fit")
    assert f"largest context that runs is {tight.max_ctx}" in tight.reason
    assert 0 < tight.max_ctx < 131072
    hopeless = plan(layouts("llama31-8b"), machine(ram_mib=2000), FitParams(n_ctx=4096))
    assert hopeless.verdict == "wont_fit" and hopeless.max_ctx is None


def test_fixed_gpu_layers_that_do_not_fit_are_reported_not_changed(layouts) -> None:
    p = plan(layouts("llama31-8b"), machine(("GPU", 4096)), FitParams(n_ctx=8192, gpu_layers=33))
    assert p.verdict == "wont_fit" and p.breakdown.gpu_layers == 33
    assert "GPU0 would need" in p.reason


@pytest.mark.parametrize("key", ["llama31-8b", "mixtral-8x7b", "gemma2-9b"])
def test_search_results_grow_with_memory(layouts, key: str) -> None:
    layout = layouts(key)
    vrams = (2048, 6144, 12288, 49152)
    plans = [plan(layout, machine(("GPU", vram)), FitParams(n_ctx=4096)) for vram in vrams]
    offload = [(p.breakdown.gpu_layers, -p.breakdown.n_cpu_moe) for p in plans]
    assert offload == sorted(offload)
    full_ctx = [p.max_ctx_full_gpu or 0 for p in plans]
    assert full_ctx == sorted(full_ctx)
    for p in plans:
        assert (p.max_ctx or 0) >= (p.max_ctx_full_gpu or 0)


def test_largest_full_gpu_context_is_the_edge(layouts) -> None:
    layout = layouts("mistral-7b")
    p = plan(layout, machine(("GPU", 8192)), FitParams(n_ctx=4096, kv_type_k="f16"))
    edge = p.max_ctx_full_gpu
    assert edge and edge % 256 == 0

    def full_total(ctx: int) -> float:
        return memory_breakdown(layout, FitParams(n_ctx=ctx, kv_type_k="f16"), [8192]).gpus[0].total_mib

    assert edge < 32768 and full_total(edge) <= 8192 - 512 < full_total(edge + 256)


# --- the command -------------------------------------------------------------------------------------

def test_json_lists_gpus_first_and_the_host_last(llama8b_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = fit_json(llama8b_path, capsys, "--gpu-mib", "24000", "--gpu-mib", "12000", "--ram-mib", "32000")
    assert [d["name"] for d in data["devices"]] == ["GPU0", "GPU1", "host"]
    keys = {"n_ctx", "gpu_layers", "kv_type", "flash_attn", "verdict", "reason", "max_ctx_full_gpu",
            "max_ctx"}
    assert keys <= data.keys()
    assert isinstance(data["flash_attn"], bool)
    for d in data["devices"]:
        assert {"weights_mib", "kv_mib", "compute_mib", "overhead_mib"} <= d.keys()


def test_table_output_reads_like_a_plan(llama8b_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", str(llama8b_path), "--gpu-mib", "0", "--ram-mib", "16000", "--ctx", "4096"]) == 0
    out = capsys.readouterr().out
    assert "host" in out and "cpu_only: runs on the CPU only" in out
    assert "reads the 4.33 GB file once while loading" in out


def test_bad_input_gets_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", str(tmp_path / "missing.gguf")]) == 2
    assert "cannot open" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", str(tmp_path / "x.gguf"), "--gpu-layers", "many"])
