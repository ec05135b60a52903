"""Quality from evidence: each model's rating rests on published measurements, parameter counts only rank
sizes within a family, a mixture of experts is rated by what it measured, and quants cost what llama.cpp's
KL-divergence tables say. The constants are checked against the figures in the catalog they summarize."""

from __future__ import annotations

import math
import statistics

import pytest

from bridge import catalog, quality
from bridge.catalog import CatalogModel, Shape

ARENA_PAIRS = [  # the family pairs behind ELO_PER_EFOLD: (smaller, its size, larger, its size), one snapshot
    ("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", 8, "bartowski/Meta-Llama-3.1-70B-Instruct-GGUF", 70),
    ("bartowski/gemma-2-9b-it-GGUF", 9, "bartowski/gemma-2-27b-it-GGUF", 27),
    ("ggml-org/gemma-3-4b-it-GGUF", 4, "lm-kit/gemma-3-12b-instruct-gguf", 12),
    ("lm-kit/gemma-3-12b-instruct-gguf", 12, "ggml-org/gemma-3-27b-it-GGUF", 27),
]


@pytest.fixture(scope="module")
def cat() -> catalog.Catalog:
    return catalog.bundled()


def arena(cat: catalog.Catalog, repo: str) -> float:
    return float(cat.get(repo).quality["arena"]["score"])


def test_the_size_term_is_what_families_gain_per_e_fold_on_the_arena(cat) -> None:
    slopes = [(arena(cat, b) - arena(cat, a)) / math.log(nb / na) for a, na, b, nb in ARENA_PAIRS]
    slopes.append((1166.5 - 1110.9) / math.log(3))  # Llama-3.2 3B (not in the catalog) / 1B, same snapshot
    assert statistics.median(slopes) == pytest.approx(quality.ELO_PER_EFOLD, abs=0.2)


def test_role_play_counts_half_as_much_as_the_arena(cat) -> None:
    figures = [m.quality for m in cat.models]
    both = [q for q in figures if _measured(q.get("arena")) and _measured(q.get("ugi"))]
    assert len(both) == 13
    arenas = [q["arena"]["score"] for q in both]
    ugis = [q["ugi"]["score"] for q in both]
    half_spread = statistics.pstdev(arenas) / statistics.pstdev(ugis) / 2
    assert half_spread == pytest.approx(quality.UGI_POINTS, abs=0.05)
    assert statistics.median(ugis) == pytest.approx(quality.UGI_REF, abs=0.05)


def _measured(figure: dict | None) -> bool:
    return bool(figure) and figure.get("score") is not None and not figure.get("estimated")


def test_a_mixture_of_experts_is_rated_by_its_measurement_not_its_total_parameters(cat) -> None:
    mixtral = quality.rating(cat.get("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF"))
    assert not mixtral.estimated and mixtral.arena == pytest.approx(1196.8)
    for newer in ("bartowski/Qwen2.5-32B-Instruct-GGUF", "bartowski/gemma-2-27b-it-GGUF",
                  "TheDrummer/Cydonia-22B-v1-GGUF", "bartowski/Mistral-Small-24B-Instruct-2501-GGUF"):
        assert quality.rating(cat.get(newer)).points > mixtral.points + 50, newer
    oss = quality.rating(cat.get("unsloth/gpt-oss-20b-GGUF"))
    assert oss.arena == pytest.approx(1317.6) and oss.ugi_points == 0 and oss.estimated  # no UGI figure


def test_parameters_rank_sizes_within_one_family(cat) -> None:
    qwen = [quality.rating(cat.get(f"bartowski/Qwen2.5-{n}B-Instruct-GGUF")).arena for n in (3, 7, 14, 32)]
    scaled_from_72b = 1302.9 - quality.ELO_PER_EFOLD * math.log(72 / 32)
    assert qwen == sorted(qwen) and qwen[-1] == pytest.approx(scaled_from_72b, abs=0.1)
    figure = cat.get("bartowski/Qwen2.5-14B-Instruct-GGUF").quality["arena"]
    assert figure["estimated"] and "qwen2.5-72b-instruct 1302.9" in figure["reason"]


def test_a_fine_tune_is_rated_as_its_base_and_its_role_play_figure_moves_it(cat) -> None:
    base = quality.rating(cat.get("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"))
    tune = quality.rating(cat.get("l3utterfly/Lumimaid-v0.2-8B-gguf"))
    assert tune.arena == base.arena and tune.estimated
    assert tune.points - base.points == pytest.approx(quality.UGI_POINTS * (25.77 - 7.45), abs=0.01)


def test_a_model_no_leaderboard_rates_is_placed_by_its_size_and_says_so() -> None:
    found = CatalogModel("someone/New-14B-GGUF", "New-14B", 14.0, True, 14.0, None, None, None, None,
                         Shape(), [])
    rated = quality.rating(found)
    assert rated.estimated and "estimated from its size alone" in rated.basis
    assert rated.arena == pytest.approx(1211.3 + quality.ELO_PER_EFOLD * math.log(14 / 8))


def test_quant_loss_follows_the_kld_tables_with_the_guides_weights(cat) -> None:
    llama = cat.get("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF")
    losses = [quality.quant_loss(llama, q) for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")]
    assert losses == sorted(losses) and losses[3] == pytest.approx(3 * 0.0313)  # 8B: small-model weight x3
    big = cat.get("bartowski/Meta-Llama-3.1-70B-Instruct-GGUF")
    assert quality.quant_loss(big, "Q4_K_M") == pytest.approx(0.0313)
    kunoichi = cat.get("brittlewis12/Kunoichi-DPO-v2-7B-GGUF")  # trained before 2024: loses less
    assert quality.quant_loss(kunoichi, "Q4_K_M") == pytest.approx(3 * 0.4 * 0.0313)
    assert quality.points_at(big, "Q4_K_M") == pytest.approx(
        quality.rating(big).points - 0.0313 / quality.NATS_PER_POINT)
    assert [quality.nominal_bits(q) for q in ("IQ2_M", "Q3_K_L", "Q4_K_S", "Q8_0", "F16", "TQ1_0")] == [
        2, 3, 4, 8, 16, 1]
