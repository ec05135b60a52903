"""The planner's per-layer tables give exactly what the per-layer rules give.

`fit.LayerTable` works each layout's figures out once so the planner's searches are cheap (issue 5). Here
every breakdown it gives is compared, to the last bit, with the rules applied layer by layer as written in
section 3 of bridge/fit.py (`place`, `kv_layer_bytes`, `block_graph`, the compute buffers), over real
architectures (dense, MoE, split experts, sliding window, MLA, Mamba) and a spread of settings; then whole
plans and a whole recommendation with the reference in place of the tables.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict

import pytest

from bridge import catalog, fit, recommend
from bridge.fit import FitParams, Matrix, ModelLayout
from bridge.gguf import read_file
from bridge.hardware import CPUInfo, GPUInfo, HardwareReport
from tests.fixtures.sparse_models import ALL_SPECS

GPU_SPLITS: list[tuple[float, ...]] = [(), (8000.0,), (24000.0,), (81000.0,), (0.0,), (8000.0, 16000.0),
                                       (12000.0, 0.0, 6000.0)]


def reference_breakdown(layout: ModelLayout, params: FitParams, gpu_free: Sequence[float] = (),
                        cpu_repack: bool = True, offload_gpu: int | None = 0) -> fit.Breakdown:
    """`memory_breakdown` as a loop over the layers and the matrices of each, with no table."""
    info = layout.info
    att = fit.resolve_attention(params, info)
    ngl = info.n_layer + 1 if params.gpu_layers is None else params.gpu_layers
    n_cpu_moe = info.n_layer if params.cpu_moe else min(params.n_cpu_moe, info.n_layer)
    if not info.is_moe:
        n_cpu_moe = 0
    where = fit.place(info.n_layer, ngl, gpu_free, n_cpu_moe)
    graphs = [fit.block_graph(layout, att, il) for il in range(info.n_layer)]
    segments = fit.layer_segments(graphs, where.blocks, where.experts_on_host)
    inputs, (logits, out_weight) = fit.graph_inputs(info, att), fit.output_bytes(layout, att)
    gpu_compute, host_compute = fit.compute_buffers(segments, where.output, len(gpu_free), inputs, logits,
                                                    out_weight, att.n_ubatch, offload_gpu)
    gpus = [_gpu_memory(layout, att, where, g, gpu_compute[g]) for g in range(len(gpu_free))]
    host = _host_memory(layout, att, where, cpu_repack, host_compute)
    ngl = 0 if not gpu_free else max(0, min(ngl, info.n_layer + 1))
    return fit.Breakdown(att.n_ctx, att.n_ubatch, ngl, info.n_layer, att.type_k, att.type_v, att.flash_attn,
                         n_cpu_moe, gpus, host)


def _on_host(layout: ModelLayout, where: fit.Placement) -> list[Matrix]:
    found = [m for il, d in enumerate(where.blocks) for m in layout.blocks[il]
             if d < 0 or (m.expert and where.experts_on_host[il])]
    return found + layout.output if where.output < 0 else found


def _gpu_memory(layout: ModelLayout, att: fit.Attention, where: fit.Placement, g: int,
                compute: float) -> fit.DeviceMemory:
    info = layout.info
    layers = [il for il, d in enumerate(where.blocks) if d == g]
    has_output = where.output == g
    weights = sum(m.nbytes for il in layers for m in layout.blocks[il]
                  if not (m.expert and where.experts_on_host[il]))
    if has_output:
        weights += sum(m.nbytes for m in layout.output)
        weights += layout.token_embd if info.tied_output else 0
    kv = sum(fit.kv_layer_bytes(info, att, il) for il in layers)
    return fit.DeviceMemory(f"GPU{g}", fit.mib(weights), fit.mib(kv), fit.mib(compute),
                            float(fit.CUDA_CONTEXT_MIB))


def _host_memory(layout: ModelLayout, att: fit.Attention, where: fit.Placement, cpu_repack: bool,
                 compute: float) -> fit.HostMemory:
    info = layout.info
    layers = [il for il, d in enumerate(where.blocks) if d < 0]
    has_output = where.output < 0
    matrices = _on_host(layout, where)
    weights = sum(m.nbytes for m in matrices) + layout.token_embd + layout.input_other
    repack = sum(m.nbytes for m in matrices if m.repackable) if cpu_repack else 0
    sparse = 0 if (info.tied_output and has_output) else layout.token_embd
    kv = sum(fit.kv_layer_bytes(info, att, il) for il in layers)
    overhead = fit.host_overhead_bytes(info, att)
    resident = weights - sparse + kv + compute + overhead
    return fit.HostMemory("host", fit.mib(weights), fit.mib(kv), fit.mib(compute), fit.mib(overhead),
                          repack_mib=fit.mib(repack), resident_mib=fit.mib(resident),
                          file_read_mib=fit.mib(layout.total_bytes))


@pytest.fixture(scope="module")
def layouts(sparse_model) -> dict[str, ModelLayout]:
    return {key: ModelLayout.from_header(read_file(sparse_model(key))) for key in ALL_SPECS}


def use_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on every breakdown the planner asks for comes from the reference, not the tables."""

    def breakdown(self: fit.LayerTable, params: FitParams, gpu_free: Sequence[float],
                  cpu_repack: bool, offload_gpu: int | None = 0) -> fit.Breakdown:
        return reference_breakdown(self.layout, params, gpu_free, cpu_repack, offload_gpu)

    monkeypatch.setattr(fit.LayerTable, "breakdown", breakdown)


def settings(layout: ModelLayout, rng: random.Random) -> tuple[FitParams, tuple[float, ...], bool]:
    """One random configuration that llama.cpp accepts for this model."""
    n = layout.info.n_layer
    kv_k = rng.choice([None, "f16", "q8_0", "q4_0"])
    kv_v = kv_k if layout.info.is_mla else rng.choice([None, kv_k, "f16", "q8_0"])
    quantized_v = (kv_v or kv_k or "f16") != "f16"
    params = FitParams(
        n_ctx=rng.choice([None, 256, 1000, 4096, 5000, 8192, 32768]),
        n_ubatch=rng.choice([512, 512, 256, 1024]),
        kv_type_k=kv_k,
        kv_type_v=kv_v,
        flash_attn=rng.choice(["on", "auto"] if quantized_v else ["on", "off", "auto"]),
        gpu_layers=rng.choice([None, None, 0, 1, n // 2, n - 1, n, n + 1, n + 5, -3]),
        cpu_moe=rng.random() < 0.1,
        n_cpu_moe=rng.choice([0, 0, 1, n // 3, n, n + 2]),
        n_seq=rng.choice([1, 1, 2, 4]),
        swa_full=rng.random() < 0.2,
    )
    return params, rng.choice(GPU_SPLITS), rng.random() < 0.8


@pytest.mark.parametrize("key", sorted(ALL_SPECS))
def test_breakdowns_match_the_layer_by_layer_rules(layouts, key: str) -> None:
    layout, rng = layouts[key], random.Random(key)
    table = fit.LayerTable(layout)  # one table for all settings, as a plan uses it
    for _ in range(150):
        params, gpu_free, repack = settings(layout, rng)
        expected = asdict(reference_breakdown(layout, params, gpu_free, repack))
        assert asdict(table.breakdown(params, gpu_free, repack)) == expected, (params, gpu_free, repack)
        assert asdict(fit.memory_breakdown(layout, params, gpu_free, repack)) == expected


def desktop(*gpus_mib: int, ram_mib: int = 32768) -> HardwareReport:
    gpus = [GPUInfo(i, "GPU", mib, mib - 300, 300, bandwidth_gbs=400.0) for i, mib in enumerate(gpus_mib)]
    return HardwareReport(cpu=CPUInfo("cpu", 8, 16, True, False), ram_total_mib=ram_mib,
                          ram_available_mib=int(ram_mib * 0.8), swap_total_mib=0, swap_free_mib=0, gpus=gpus,
                          gpu_offload_supported=bool(gpus), cpu_bandwidth_gbs=51.2)


MACHINES = [desktop(8192), desktop(24576, ram_mib=65536), desktop(), desktop(8192, 6144, ram_mib=16384)]


def test_plans_match_the_layer_by_layer_rules(layouts, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [(layout, machine, FitParams(n_ctx=ctx, flash_attn=fa))
             for layout in layouts.values() for machine in MACHINES
             for ctx, fa in [(None, "auto"), (16384, "off")]]
    fast = [fit.plan(layout, machine, params).to_dict() for layout, machine, params in cases]
    use_reference(monkeypatch)
    assert [fit.plan(layout, machine, params).to_dict() for layout, machine, params in cases] == fast


@pytest.mark.parametrize("machine", MACHINES[:3], ids=["8g", "24g", "cpu"])
def test_recommendation_matches_the_layer_by_layer_rules(machine: HardwareReport,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fast = recommend.recommend(catalog.bundled(), machine, n_ctx=16384).to_dict()
    use_reference(monkeypatch)
    assert recommend.recommend(catalog.bundled(), machine, n_ctx=16384).to_dict() == fast
