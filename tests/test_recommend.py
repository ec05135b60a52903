"""The recommender on a panel of ordinary machines, against the answers an experienced local-LLM user accepts.

Each profile is a whole desktop or laptop, described by what decides the answer: RAM, cores (and the RAM
bandwidth that goes with them), and where there is one, a GPU of a common card with its memory bandwidth.
The speeds are the recommender's estimates for that hardware (no measurement of the machine running the
tests). For each profile the panel names the answers an expert accepts, and why; every pick must be one
of them, and every pick must keep the guide's rules.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import pytest

from bridge import catalog, quality, recommend
from bridge.hardware import CPUInfo, GPUInfo, HardwareReport

# Cards by VRAM: a common card of that size and its memory bandwidth (GB/s, the makers' figures).
CARDS = {
    4: ("GTX 1650", 128.0),
    6: ("RTX 2060", 336.0),
    8: ("RTX 3060 Ti", 448.0),
    12: ("RTX 3060", 360.0),
    16: ("RTX 4060 Ti 16GB", 288.0),
    24: ("RTX 3090", 936.0),
}
LAPTOP_DDR4_GBS = 25.6  # one channel of DDR4-3200: a 2-core laptop
DESKTOP_DDR4_GBS = 51.2  # two channels of DDR4-3200


def machine(ram_gib: float, gpu_gib: float = 0, *, cores: int = 8, n_gpus: int = 1) -> HardwareReport:
    """A machine with `ram_gib` of RAM (80 % of it free) and `n_gpus` cards of `gpu_gib` (0: none)."""
    name, bandwidth = CARDS.get(int(gpu_gib), ("GeForce", 448.0))
    vram = int(gpu_gib * 1024)
    cards = range(n_gpus) if gpu_gib else range(0)
    gpus = [GPUInfo(i, name, vram, vram - 400, 400, bandwidth_gbs=bandwidth) for i in cards]
    return HardwareReport(
        cpu=CPUInfo("desktop", cores, cores * 2, True, False),
        ram_total_mib=int(ram_gib * 1024),
        ram_available_mib=int(ram_gib * 1024 * 0.8),
        swap_total_mib=0,
        swap_free_mib=0,
        gpus=gpus,
        gpu_offload_supported=bool(gpus),
        cpu_bandwidth_gbs=LAPTOP_DDR4_GBS if cores <= 2 else DESKTOP_DDR4_GBS,
    )


@pytest.fixture(scope="module")
def cat() -> catalog.Catalog:
    return catalog.bundled()


# --- what an expert accepts ----------------------------------------------------------------------------

# Families by the base model they are trained from: a fine-tune counts with its base.
SMALL = {"Qwen2.5-3B-Instruct", "Llama-3.2-1B-Instruct"}
EIGHT_B = {"Kunoichi-DPO-v2-7B", "Meta-Llama-3.1-8B-Instruct", "L3-8B-Stheno-v3.2", "Lumimaid-v0.2-8B",
           "Qwen2.5-7B-Instruct", "Qwen_Qwen3-8B", "gemma-2-9b-it"}
TWELVE_B = {"Mistral-Nemo-Instruct-2407", "Rocinante-12B-v1", "Rocinante-12B-v1.1", "MN-12B-Mag-Mell-R1",
            "magnum-v4-12b", "gemma-3-12b-instruct", "phi-4", "Qwen2.5-14B-Instruct"}
MOE_20B = {"gpt-oss-20b"}  # 21B, 3.6B active: a 12-14 GB file that writes like a 4B
MID_24B = {"Mistral-Small-24B-Instruct-2501", "Mistral-Small-3.1-24B-Instruct-2503",
           "TheDrummer_Cydonia-24B-v2", "Cydonia-22B-v1", "gemma-2-27b-it", "magnum-v4-27b",
           "Qwen2.5-32B-Instruct"}
BIG_70B = {"Llama-3.3-70B-Instruct", "Meta-Llama-3.1-70B-Instruct", "magnum-v4-72b"}


@dataclass(frozen=True)
class Expected:
    models: frozenset[str]
    verdicts: frozenset[str]
    why: str


def expect(models: set[str], verdicts: set[str], why: str) -> Expected:
    return Expected(frozenset(models), frozenset(verdicts), why)


CPU = {"cpu_only"}
FULL = {"full_gpu"}
ANY_GPU = {"full_gpu", "partial_gpu"}
CPU_SMALL = expect(SMALL, CPU, "8 GB leaves ~4 GB for a model: a 1-4B at 4 bits or more; a 7B at Q4 needs 5")
CPU_MID = expect(
    SMALL | EIGHT_B | TWELVE_B | MOE_20B, CPU,
    "without a GPU the guide's answer under 32 GB is a 7B-class model; today that is a 7-14B, or the 21B "
    "mixture of experts that needs the memory of a 14B and writes like a 4B (gpt-oss-20b, Arena 1318); "
    "22B and up write under 3 tokens/s from RAM, and Mixtral (Arena 1197) is rated below all of them",
)
CPU_TWO_CORES = expect(
    SMALL | EIGHT_B | TWELVE_B | MOE_20B, CPU,
    "two cores read a prompt at ~15-40 tokens/s on a 7-12B: a new 8k chat waits minutes, so smaller or "
    "MoE models that start sooner are as acceptable as the 8B class",
)

PANEL: dict[str, tuple[HardwareReport, Expected]] = {
    **{f"CPU {r} GB, {c} cores": (machine(r, cores=c), CPU_SMALL) for r in (8,) for c in (2, 8, 16)},
    **{f"CPU {r} GB, {c} cores": (machine(r, cores=c), CPU_TWO_CORES if c == 2 else CPU_MID)
       for r in (16, 24, 32, 64) for c in (2, 8, 16)},
    **{f"{g} GB GPU + {r} GB": (machine(r, g), expect(
        EIGHT_B | TWELVE_B | MOE_20B, ANY_GPU,
        "4-6 GB hold a 7-8B at Q4 or part of a 12B: either, at reading speed or better (a 12B mostly on "
        "the CPU of an 8-core desktop writes ~6 tokens/s; the MoE keeps its experts in RAM)"))
       for g in (4, 6) for r in (16, 32, 64)},
    **{f"8 GB GPU + {r} GB": (machine(r, 8), expect(
        EIGHT_B | TWELVE_B | MOE_20B, ANY_GPU,
        "an 8 GB card holds a 7-9B at Q5-Q8 fully (~50 tokens/s) or most of a 12B at Q4-Q6 (~10 tokens/s); "
        "a 24B would run mostly from RAM under reading speed"))
       for r in (16, 32, 64)},
    **{f"12 GB GPU + {r} GB": (machine(r, 12), expect(
        EIGHT_B | TWELVE_B, FULL,
        "12 GB: a 12-14B at Q4-Q6 fully on the card (~25-40 tokens/s); not Mixtral or a 24B with layers in "
        "RAM at ~6-7 tokens/s"))
       for r in (16, 32, 64)},
    **{f"16 GB GPU + {r} GB": (machine(r, 16), expect(
        TWELVE_B | MID_24B, FULL,
        "16 GB: a 22-24B at Q4 or a 12-14B at Q6-Q8, fully on the card"))
       for r in (16, 32, 64)},
    **{f"24 GB GPU + {r} GB": (machine(r, 24), expect(
        MID_24B, FULL,
        "24 GB: a 22-32B (Mistral Small 24B, Cydonia, Qwen2.5-32B, Gemma-2-27B) at 4-6 bits fully on the "
        "card, never Mixtral: a December 2023 MoE (Arena 1197) below newer dense models of half its size"))
       for r in (16, 32, 64)},
    "2 x 12 GB GPU + 64 GB": (machine(64, 12, n_gpus=2), expect(
        MID_24B, FULL, "24 GB over two cards: a 22-32B at 4-6 bits split across them")),
    "2 x 24 GB GPU + 128 GB, 16 cores": (machine(128, 24, cores=16, n_gpus=2), expect(
        BIG_70B | MID_24B, FULL, "48 GB over two cards: a 70B at Q4 fully on them, or a 22-32B at Q8")),
}


@pytest.fixture(scope="module")
def answers(cat: catalog.Catalog) -> dict[str, recommend.Recommendation]:
    return {name: recommend.recommend(cat, report) for name, (report, _) in PANEL.items()}


@pytest.mark.parametrize("name", list(PANEL))
def test_the_pick_is_one_an_expert_accepts(name: str, answers: dict[str, recommend.Recommendation]) -> None:
    _, expected = PANEL[name]
    best = answers[name].best
    assert best is not None, name
    assert best.name in expected.models and best.verdict in expected.verdicts, (
        f"{name}: picked {best.name} {best.quant} ({best.verdict}); an expert accepts "
        f"{sorted(expected.models)} ({sorted(expected.verdicts)}): {expected.why}"
    )
    assert best.expected_tok_s >= recommend.READING_TOK_S - 0.5, best.reason


# --- the guide's rules ---------------------------------------------------------------------------------

FOURTEEN_B_Q8_MIB = 15.7e9 / 2**20  # a 14B at Q8_0 (phi-4's 15.7 GB): the largest 7-14B-class file


@pytest.mark.parametrize("ram", [8, 16, 24])
@pytest.mark.parametrize("cores", [2, 8, 16])
def test_under_32_gb_without_a_gpu_a_7_14b_class_model(ram: int, cores: int, answers) -> None:
    """The guide: with less than 32 GB of RAM use a 7B (Kunoichi). The class is what the model costs to run:
    no file bigger than a 14B at Q8_0, never Mixtral, and at reading speed."""
    best = answers[f"CPU {ram} GB, {cores} cores"].best
    assert best is not None and best.verdict == "cpu_only"
    assert best.size_mib <= FOURTEEN_B_Q8_MIB and "Mixtral" not in best.name, best.reason
    assert best.params_b <= 14.7 or best.active_params_b <= 4, best.reason  # dense 7-14B, or a 4B-active MoE


def test_no_2_bit_quant_is_ever_recommended_and_3_bit_only_where_nothing_better_fits(answers) -> None:
    for name, rec in answers.items():
        for c in rec.candidates:
            bits = quality.nominal_bits(c.quant)
            assert bits is None or bits >= 4, f"{name}: {c.name} {c.quant} ranked"
        ranked_kinds = [c for c in rec.left_out if c.verdict != "not_ranked"]
        two_bit = [c for c in ranked_kinds if quality.nominal_bits(c.quant) in (1, 2)]
        assert all(c.left_out.startswith(("a 1-bit", "a 2-bit", "does not fit")) for c in two_bit), name


def test_a_3_bit_quant_is_kept_when_nothing_at_4_bits_fits(cat: catalog.Catalog) -> None:
    """The floor is the guide's 'nothing better fits': among one model's own quants in the switcher."""
    report = machine(32)  # 24 GB for the model: Mixtral's Q3_K_M fits, its Q4_0 does not
    options = {c.quant: c for c in recommend.quants(cat, "TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF", report)}
    assert options["Q4_0"].verdict == "wont_fit" and options["Q3_K_M"].verdict == "cpu_only"
    assert options["Q3_K_M"].left_out is None
    assert "2-bit" in options["Q2_K"].left_out
    # The same 3-bit file in a recommendation, where plenty fits at 4 bits and more: left out, and why.
    rec = recommend.recommend(cat, report)
    mixtral = {c.quant: c.left_out for c in rec.left_out if "Mixtral" in c.repo}
    assert "floor is 4 bits where something better fits" in mixtral["Q3_K_M"]


# --- the three machines ------------------------------------------------------------------------


def test_24_gb_of_ram_and_no_gpu_is_not_mixtral_at_q2_k(answers) -> None:
    rec = answers["CPU 24 GB, 8 cores"]
    assert "Mixtral" not in rec.best.name
    reasons = {c.quant: c.left_out for c in rec.left_out if "Mixtral" in c.repo}
    assert "dead horse" in reasons["Q2_K"] and "does not fit" in reasons["Q3_K_M"]


def test_a_24_gb_gpu_gets_a_newer_dense_model_over_mixtral_and_says_why(answers) -> None:
    rec = answers["24 GB GPU + 64 GB"]
    best = rec.best
    assert best.name in MID_24B and best.verdict == "full_gpu" and 4 <= quality.nominal_bits(best.quant) <= 6
    assert best.memory["gpu_mib"] > 0.7 * 24 * 1024
    assert best.reason.startswith(f"best pick: {best.name} at {best.quant}: ")
    assert "runs fully on your GPU" in best.reason and "first reply after ~" in best.reason
    mixtral = next(c for c in rec.candidates if "Mixtral" in c.name)
    assert mixtral.score < best.score
    assert "rated lower: 1" in mixtral.reason and "Arena 1197" in mixtral.reason
    # Every newer dense 22-32B that fits the card ranks above the MoE counted as 46.7B.
    newer = [c for c in rec.candidates if c.name in MID_24B and c.verdict == "full_gpu"]
    assert len(newer) >= 4 and all(c.score > mixtral.score for c in newer)


def test_a_12_gb_gpu_runs_a_12b_fully_on_the_card_not_mixtral_from_ram(answers) -> None:
    rec = answers["12 GB GPU + 32 GB"]
    best = rec.best
    assert best.verdict == "full_gpu" and best.expected_tok_s >= 20 and best.first_reply_s < 20
    mixtral = next(c for c in rec.candidates if "Mixtral" in c.name)
    assert mixtral.verdict == "partial_gpu" and mixtral.expected_tok_s < 10
    assert rec.candidates.index(mixtral) > 5


def test_the_wait_for_the_first_reply_is_shown_and_ranked_with(cat: catalog.Catalog) -> None:
    """A 2-core CPU reads an 8B's 8k prompt at ~17 tokens/s: the wait is minutes, and it counts."""
    rec = recommend.recommend(cat, machine(32, cores=2))
    by_name = {c.name: c for c in rec.candidates}
    llama = by_name["Meta-Llama-3.1-8B-Instruct"]
    assert llama.first_reply_s > 5 * 60 and llama.wait_cost > 0 and llama.prompt_tok_s < 30
    assert rec.best.first_reply_s < llama.first_reply_s
    fast = recommend.recommend(cat, machine(32, cores=16)).best
    assert fast.first_reply_s < rec.best.first_reply_s / 4  # 8x the cores: the prompt is read ~8x faster
    data = rec.to_dict()["best"]
    assert {"first_reply_s", "prompt_tok_s", "wait_cost", "rating"} <= set(data)


def test_too_long_a_first_reply_is_left_out_with_the_wait(cat: catalog.Catalog) -> None:
    rec = recommend.recommend(cat, machine(64, cores=2), n_ctx=32768)
    waits = [c.left_out for c in rec.left_out if c.left_out and "too long to wait" in c.left_out]
    assert waits and all("first reply of a new chat would come after ~" in w for w in waits)
    assert all(c.first_reply_s <= recommend.MAX_WAIT_S for c in rec.candidates)


# --- explanations --------------------------------------------------------------------------------------


def test_each_pick_says_why_it_beats_the_runner_up_and_each_runner_up_why_it_is_lower(answers) -> None:
    for name, rec in answers.items():
        best, runner = rec.candidates[0], rec.candidates[1]
        assert best.reason.startswith(f"best pick: {best.name} at {best.quant}: "), name
        assert runner.name in best.reason.split(";")[0], f"{name}: the pick does not name the runner-up"
        assert all(c.reason.startswith("runner-up (") for c in rec.candidates[1:]), name
        assert all(c.left_out for c in rec.left_out), name


def test_vision_and_embedding_models_are_never_ranked_as_chat_models(answers) -> None:
    for rec in answers.values():
        ranked = {c.repo for c in rec.candidates}
        assert not ranked & {"ggml-org/gemma-3-27b-it-GGUF", "nomic-ai/nomic-embed-text-v1.5-GGUF"}
        kinds = {c.repo: c.left_out for c in rec.left_out if c.verdict == "not_ranked"}
        assert "a vision model" in kinds["ggml-org/gemma-3-4b-it-GGUF"]
        assert "an embedding model" in kinds["vonjack/bge-m3-gguf"]


def test_json_is_a_superset_of_the_documented_fields(answers) -> None:
    data = answers["CPU 16 GB, 8 cores"].to_dict()
    needed = {"repo", "file", "quant", "params_b", "size_mib", "verdict", "gpu_layers", "n_ctx",
              "expected_tok_s", "reason", "badge", "quality", "speed_cost", "placement_cost", "score"}
    assert needed <= set(data["best"]) and all(needed <= set(c) for c in data["candidates"])
    assert {"best", "n_ctx", "ram_for_model_mib", "candidates", "left_out", "speeds"} <= set(data)
    assert all(entry["reason"] for entry in data["left_out"])
    assert data["speeds"].startswith("estimated from 8 cores")


# --- properties ----------------------------------------------------------------------------------------


def test_more_memory_never_yields_a_worse_pick(cat: catalog.Catalog) -> None:
    """The pick's score (what the recommender rates it) never drops when RAM or VRAM grows."""
    for sweep in ([machine(r) for r in range(8, 41, 2)], [machine(32, g) for g in range(4, 25, 2)]):
        scores = [recommend.recommend(cat, m).best.score for m in sweep]
        assert all(b >= a - 1e-9 for a, b in itertools.pairwise(scores)), scores


def _related(a: recommend.Candidate, b: recommend.Candidate, cat: catalog.Catalog) -> bool:
    """The same model, or models of one base (fine-tunes share their base's shape)."""
    sa, sb = cat.get(a.repo).shape, cat.get(b.repo).shape
    same_shape = (sa.n_layer, sa.n_embd, sa.n_ff) == (sb.n_layer, sb.n_embd, sb.n_ff)
    return a.repo == b.repo or (sa.complete and same_shape)


@pytest.mark.parametrize("gpu", [6, 8, 12, 16, 24])
def test_a_few_hundred_mb_never_flips_the_pick_between_unrelated_models(gpu: int, cat) -> None:
    """300 MB more or less VRAM: the same pick, a related one, or one that the change itself made possible
    (it did not fit, or not fully on the GPU, with the smaller figure)."""
    picks = [recommend.recommend(cat, machine(32, gpu + delta / 1024)).best for delta in (-300, 0, 300)]
    for small, large in itertools.pairwise(picks):
        if _related(small, large, cat):
            continue
        options = recommend.quants(cat, large.repo, machine(32, gpu))
        before = next((c for c in options if c.file == large.file), None)
        assert before is not None and before.verdict != large.verdict, (small.name, large.name)


def test_recommend_stays_under_a_second(cat: catalog.Catalog) -> None:
    """The slowest panel machines (small GPUs: every quant is a layer search). CPU time, best of three, so
    other processes on a shared test machine do not count."""
    for report in (machine(64, 6), machine(64, 4), machine(128, 24, n_gpus=2)):
        spent = []
        for _ in range(3):
            started = time.process_time()
            recommend.recommend(catalog.bundled(), report)
            spent.append(time.process_time() - started)
        assert min(spent) < 1.0, spent


# --- unchanged policy figures --------------------------------------------------------------------------


def test_speed_and_wait_costs_start_at_reading_speed_and_half_a_minute() -> None:
    assert recommend.speed_cost(recommend.READING_TOK_S * 3) == 0.0
    assert recommend.speed_cost(recommend.READING_TOK_S / 2.718281828) == pytest.approx(recommend.SLOW_NATS)
    assert recommend.wait_cost(recommend.WAIT_OK_S) == 0.0
    assert recommend.wait_cost(recommend.WAIT_OK_S * 2.718281828) == pytest.approx(recommend.WAIT_NATS)


def test_desktop_reserve_is_4_gib_or_a_quarter_of_the_ram() -> None:
    assert recommend.desktop_reserve_mib(machine(8)) == 4096
    assert recommend.desktop_reserve_mib(machine(64)) == 16384


def test_the_quant_switcher_plans_a_vision_model_but_not_an_embedding_model(cat: catalog.Catalog) -> None:
    """Recommendations rank chat models only; someone who has a vision model may still switch its quant."""
    gemma = {c.quant: c for c in recommend.quants(cat, "ggml-org/gemma-3-4b-it-GGUF", machine(16, 8))}
    assert gemma["Q4_K_M"].verdict == "full_gpu" and gemma["Q4_K_M"].left_out is None
    nomic = recommend.quants(cat, "nomic-ai/nomic-embed-text-v1.5-GGUF", machine(16, 8))
    assert all(c.verdict == "not_ranked" and "embedding model" in c.left_out for c in nomic)
