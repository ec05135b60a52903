"""The recommender on the guide's hardware profiles: what fits, ranked by quality, speed and placement.

Each profile is a whole desktop: an 8-core CPU with dual-channel DDR4-3200 (51.2 GB/s), its RAM and, where it
has one, a GPU with that card class's memory bandwidth. Nothing here depends on the machine running the tests.
"""

from __future__ import annotations

import pytest

from bridge import catalog, recommend
from bridge.catalog import base_quant
from bridge.hardware import CPUInfo, GPUInfo, HardwareReport

DESKTOP_DDR4_GBS = 51.2  # 2 channels x 25.6 GB/s


def profile(gpu_gib: int, ram_gib: int, gpu_bw: float = 448.0) -> HardwareReport:
    """A desktop with `gpu_gib` of VRAM (0: none) and `ram_gib` of RAM, 80 % of it free."""
    gpus = (
        [GPUInfo(0, "GeForce", gpu_gib * 1024, gpu_gib * 1024 - 400, 400, bandwidth_gbs=gpu_bw)]
        if gpu_gib
        else []
    )
    return HardwareReport(
        cpu=CPUInfo("desktop", 8, 16, True, False),
        ram_total_mib=ram_gib * 1024,
        ram_available_mib=int(ram_gib * 1024 * 0.8),
        swap_total_mib=0,
        swap_free_mib=0,
        gpus=gpus,
        gpu_offload_supported=bool(gpus),
        cpu_bandwidth_gbs=DESKTOP_DDR4_GBS,
    )


NO_GPU_16 = profile(0, 16)
GPU_8_RAM_16 = profile(8, 16, 448.0)  # RTX 3060 Ti / 4060 Ti class
GPU_12_RAM_32 = profile(12, 32, 504.0)  # RTX 4070 class
GPU_24_RAM_64 = profile(24, 64, 1008.0)  # RTX 4090 class


@pytest.fixture(scope="module")
def cat():
    return catalog.bundled()


def small_and_least_quantized(c: recommend.Candidate) -> bool:
    """The guide's pick under 32 GB: a 7-8B model (like Kunoichi) at Q6_K or Q5_K_M (or its _L variant)."""
    return 7 <= c.params_b <= 8.5 and base_quant(c.quant) in ("Q6_K", "Q5_K_M")


def left_out_reasons(rec: recommend.Recommendation, repo_part: str) -> list[str]:
    return [c.left_out or "" for c in rec.left_out if repo_part in c.repo]


def test_no_gpu_16_gb_gets_a_7_8b_at_q5_or_q6_on_the_cpu_at_reading_speed(cat):
    rec = recommend.recommend(cat, NO_GPU_16)
    best = rec.best
    assert small_and_least_quantized(best), best.reason
    assert best.verdict == "cpu_only" and best.expected_tok_s >= recommend.READING_TOK_S
    assert best.reason.startswith("best pick: ") and "on the CPU" in best.reason
    # 16 GB keeps 4 GB for the desktop: the model gets 12.
    assert rec.ram_for_model_mib <= 12 * 1024 and "of 12 GB usable" in best.reason
    # A 12B at 4 bits fits in RAM but writes slower than one reads: it ranks lower and says why.
    nemo = next(c for c in rec.candidates if "Mistral-Nemo" in c.repo)
    assert nemo.expected_tok_s < recommend.READING_TOK_S and "slower than reading speed" in nemo.reason
    # Mixtral does not fit in 12 GB; the reason says how much it needs and what is kept for the desktop.
    assert not any("Mixtral" in c.repo for c in rec.candidates)
    assert all("does not fit" in r and "keeping 4 GB" in r for r in left_out_reasons(rec, "Mixtral"))


def test_8_gb_gpu_gets_a_7_8b_at_q5_or_q6_fully_on_the_gpu(cat):
    rec = recommend.recommend(cat, GPU_8_RAM_16)
    best = rec.best
    assert small_and_least_quantized(best), best.reason
    assert best.verdict == "full_gpu" and best.gpu_layers == best.n_layer + 1
    assert "fully on the GPU" in best.reason and "fits fully on your GeForce (8 GB)" in best.reason
    # The 22B that runs half on the CPU is bigger but slower than reading speed and only partly on the GPU.
    cydonia = next(c for c in rec.candidates if "Cydonia" in c.repo)
    assert cydonia.verdict == "partial_gpu" and cydonia.score < best.score
    assert "bigger, but" in cydonia.reason
    # A 12B partly on the GPU would still write fast enough; it loses on placement, and says so.
    nemo = next(c for c in rec.candidates if "Mistral-Nemo" in c.repo)
    if nemo.verdict == "partial_gpu":
        assert nemo.placement_cost == recommend.PARTIAL_NATS and "only partly on the GPU" in nemo.reason


def test_kunoichi_q6_k_and_q5_k_m_run_with_less_than_32_gb(cat):
    for report in (NO_GPU_16, GPU_8_RAM_16):
        by_quant = {c.quant: c for c in recommend.quants(cat, "brittlewis12/Kunoichi-DPO-v2-7B-GGUF", report)}
        assert not by_quant["Q6_K"].left_out and not by_quant["Q5_K_M"].left_out
    assert by_quant["Q6_K"].verdict == "full_gpu"  # 8 GB of VRAM holds it
    assert "small models lose too much under 4 bits" in by_quant["Q3_K_L"].left_out


def test_32_gb_of_ram_makes_mixtral_a_candidate_and_the_pick_with_a_12_gb_gpu(cat):
    rec = recommend.recommend(cat, GPU_12_RAM_32)
    best = rec.best
    assert "Mixtral" in best.repo and best.verdict == "partial_gpu" and best.n_cpu_moe > 0
    assert "12.88B active" in best.reason and "experts of" in best.reason
    assert best.expected_tok_s >= recommend.READING_TOK_S
    # The best model that runs fully on the GPU is the runner-up, ranked lower for its size.
    runner = rec.candidates[1]
    assert runner.verdict == "full_gpu" and runner.reason.startswith("runner-up (smaller)")
    # Without a GPU, 32 GB still makes Mixtral a candidate (its Q3_K_M in 24 GB).
    assert any("Mixtral" in c.repo for c in recommend.recommend(cat, profile(0, 32)).candidates)


def test_a_24_gb_gpu_gets_a_model_that_fills_it_fully_offloaded(cat):
    rec = recommend.recommend(cat, GPU_24_RAM_64)
    best = rec.best
    assert best.verdict == "full_gpu" and best.gpu_layers == best.n_layer + 1
    assert best.memory["gpu_mib"] > 0.8 * 24 * 1024  # weights, KV and buffers fill the card
    assert "fully on the GPU" in best.reason and "fits fully on your GeForce (24 GB)" in best.reason
    # The 70B would only run mostly on the CPU: below reading speed, left out or ranked under the pick.
    llama70 = [c for c in rec.candidates if "70B" in c.repo]
    assert all(c.score < best.score for c in llama70)


def test_floors_and_reasons_for_what_is_left_out(cat):
    rec = recommend.recommend(cat, GPU_8_RAM_16)
    reasons = {(c.repo, c.quant): c.left_out for c in rec.left_out}
    assert "Q8_0 of this model is as good" in reasons[("bartowski/Llama-3.2-1B-Instruct-GGUF", "F16")]
    assert "under 4 bits" in reasons[("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "IQ2_M")]
    assert "too slow to chat" in reasons[("bartowski/Meta-Llama-3.1-70B-Instruct-GGUF", "Q3_K_S")] or (
        "does not fit" in reasons[("bartowski/Meta-Llama-3.1-70B-Instruct-GGUF", "Q3_K_S")]
    )
    assert all(c.expected_tok_s >= recommend.MIN_TOK_S for c in rec.candidates)
    assert all(c.verdict != "wont_fit" for c in rec.candidates)


def test_speed_cost_is_zero_at_reading_speed_and_one_nat_per_e_fold_under_it():
    assert recommend.speed_cost(recommend.READING_TOK_S * 3) == 0.0
    slower = recommend.speed_cost(recommend.READING_TOK_S / 2.718281828)
    assert slower == pytest.approx(recommend.SLOW_NATS, rel=1e-6)


def test_desktop_reserve_is_4_gib_or_a_quarter_of_the_ram():
    assert recommend.desktop_reserve_mib(profile(0, 8)) == 4096
    assert recommend.desktop_reserve_mib(profile(0, 64)) == 16384


def test_json_entries_have_the_documented_fields(cat):
    data = recommend.recommend(cat, NO_GPU_16).to_dict()
    needed = {
        "repo",
        "file",
        "quant",
        "params_b",
        "size_mib",
        "verdict",
        "gpu_layers",
        "n_ctx",
        "expected_tok_s",
        "reason",
        "badge",
    }
    assert needed <= set(data["best"]) and all(needed <= set(c) for c in data["candidates"])
    assert all(entry["reason"] for entry in data["left_out"])
