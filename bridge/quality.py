"""How good a model is at a quant, from published measurements, in one number the recommender can weigh.

**The rating** is on the Arena's scale (LMArena's text leaderboard, open models: crowd-sourced blind
pairwise votes), because the Arena rates the most of the models people run locally, old and new, dense
and MoE, in one snapshot (scripts/catalog/quality.json records which). A model the Arena does not list is
rated from its closest measured relative and marked estimated: a fine-tune as its base model; a size of
a family by the family's measured member, moved by the size term (ELO_PER_EFOLD, below). Parameter
counts only ever rank sizes within one family: that is where the guide's "a 13B is more capable than the
7B of the same family" holds. A mixture of experts has no size term at all: its measured rating is its
quality (Mixtral 8x7B: 1197, below dense models of half its 46.7B parameters).

**Role-play**: the UGI leaderboard measures what a model knows and is willing to write where chat models
refuse, the complaint role-players have about general models. It moves the rating by UGI_POINTS per UGI
point around the catalog's median, which makes it count half as much as the Arena across the models both
rate. A model UGI has not measured is counted at the median: neither better nor worse.

**Quant loss** is the mean KL divergence from F16 that llama.cpp measured on Llama-3-8B per quant type
(tools/perplexity/README.md), in nats, x0.4 for models trained before 2024 (they lose 2.5-4x less, PR
#6936) and weighted x3 for models of 14B and under (a policy: KLD understates what quantizing costs a
small model in coherence, fit-reference 3.3). SIZE_NATS (0.36 nats per e-fold of parameters, Llama-3
8B -> 70B perplexity) and ELO_PER_EFOLD (the Arena's points per e-fold within a family) put nats and
rating points on one scale: NATS_PER_POINT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .catalog import CatalogModel, base_quant

# Rating points per e-fold of parameters within one family and generation: the median over five family
# pairs in the Arena snapshot (Llama-3.1 8B/70B 37.8, Gemma-2 9B/27B 20.5, Gemma-3 4B/12B 35.1 and
# 12B/27B 29.6, Llama-3.2 1B/3B 50.7); scripts/catalog/quality.json "size_term" lists them.
ELO_PER_EFOLD = 35.1
SIZE_NATS = 0.36  # nats per e-fold of parameters (fit-reference.md 3.3)
NATS_PER_POINT = SIZE_NATS / ELO_PER_EFOLD
# UGI: half the Arena's weight. Over the 13 catalog models both leaderboards measured, the Arena's spread
# is 6.4x UGI's (64.5 vs 10.1 points, population standard deviations); half of that is 3.2 rating points
# per UGI point. UGI_REF is their median UGI score (tests/test_quality.py recomputes both).
UGI_POINTS = 3.2
UGI_REF = 21.7
# A model no leaderboard rates (one a refresh discovered): the Llama-3.1 line through its size.
FALLBACK_ANCHOR = ("llama-3.1-8b-instruct", 1211.3, 8.0)
QUALITY_ZERO = 1000.0  # the rating that is 0 nats: only differences matter

SMALL_MODEL_B = 14.5  # "14B and under", with room for 14.x-billion counts
SMALL_MODEL_LOSS_WEIGHT = 3.0
KV_LOSS = {"f16": 0.0, "q8_0": 0.00155}  # mean KLD, Llama-3-8B (llama.cpp#7412)
# Mean KL divergence vs F16 logits, Llama-3-8B, wikitext-2 (llama.cpp tools/perplexity/README.md).
# IQ3_XS, IQ3_S, IQ2_S, Q2_K_S, Q4_1, Q5_0, Q5_1 are not in that table: interpolated between neighbours
# by bits per weight, on a log scale.
QUANT_KLD: dict[str, float] = {
    "F32": 0.0, "F16": 0.0, "BF16": 0.0, "Q8_0": 0.0014, "Q6_K": 0.0055, "Q5_K_M": 0.0108,
    "Q5_K_S": 0.0166, "Q5_1": 0.0140, "Q5_0": 0.0190, "Q4_K_M": 0.0313, "Q4_K_S": 0.0431,
    "IQ4_NL": 0.0357, "IQ4_XS": 0.0363, "Q4_1": 0.0550, "Q4_0": 0.0719, "Q3_K_L": 0.087, "Q3_K_M": 0.102,
    "IQ3_M": 0.103, "IQ3_S": 0.120, "IQ3_XS": 0.150, "IQ3_XXS": 0.184, "Q3_K_S": 0.228, "Q2_K": 0.445,
    "Q2_K_S": 0.500, "IQ2_M": 0.326, "IQ2_S": 0.430, "IQ2_XS": 0.546, "IQ2_XXS": 0.812, "IQ1_M": 1.39,
    "IQ1_S": 2.21,
}  # fmt: skip
# bartowski's _L / _XL files keep embeddings and output at Q8_0: a little better than the plain recipe.
VARIANT_BONUS = 0.9
FULL_PRECISION = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class Rating:
    """A model's rating on the Arena's scale, and what it rests on."""

    points: float
    arena: float
    ugi_points: float  # the role-play term, in rating points
    estimated: bool  # some figure it rests on is an estimate
    basis: str  # in words: "Arena 1304, UGI 39.5"

    def to_dict(self) -> dict[str, Any]:
        return {"points": round(self.points, 1), "arena": round(self.arena, 1),
                "roleplay": round(self.ugi_points, 1), "estimated": self.estimated, "basis": self.basis}


def rating(model: CatalogModel) -> Rating:
    arena_fig = model.quality.get("arena") or {}
    ugi_fig = model.quality.get("ugi") or {}
    if arena_fig.get("score") is not None:
        arena = float(arena_fig["score"])
        arena_est = bool(arena_fig.get("estimated"))
        arena_words = f"Arena {arena:.0f}{' (estimated)' if arena_est else ''}"
    else:
        name, anchor, size = FALLBACK_ANCHOR
        arena = anchor + ELO_PER_EFOLD * math.log(max(model.params_b, 0.1) / size)
        arena_est = True
        arena_words = f"Arena ~{arena:.0f} (estimated from its size alone, on {name}'s line)"
    ugi = ugi_fig.get("score")
    term = UGI_POINTS * (float(ugi) - UGI_REF) if ugi is not None else 0.0
    ugi_words = f"UGI {float(ugi):.1f}" if ugi is not None else "UGI not measured"
    estimated = arena_est or bool(ugi_fig.get("estimated")) or ugi is None
    return Rating(arena + term, arena, term, estimated, f"{arena_words}, {ugi_words}")


def quant_loss(model: CatalogModel, quant: str) -> float:
    """Nats per token lost to the weights' quantization."""
    q = quant.upper()
    kld = QUANT_KLD.get(q)
    if kld is None:
        kld = QUANT_KLD.get(base_quant(q), QUANT_KLD["Q2_K"]) * VARIANT_BONUS
    weight = SMALL_MODEL_LOSS_WEIGHT if model.params_b <= SMALL_MODEL_B else 1.0
    return weight * model.quant_sensitivity * kld


def quality_nats(model: CatalogModel, quant: str, kv_type: str = "f16") -> float:
    """The model at this quant and KV type, in nats above QUALITY_ZERO."""
    return (NATS_PER_POINT * (rating(model).points - QUALITY_ZERO) - quant_loss(model, quant)
            - KV_LOSS.get(kv_type, 0.0))


def points_at(model: CatalogModel, quant: str, kv_type: str = "f16") -> float:
    """The rating this quant keeps: the model's rating less the quant's (and the KV cache's) loss."""
    return QUALITY_ZERO + quality_nats(model, quant, kv_type) / NATS_PER_POINT


def nominal_bits(quant: str) -> int | None:
    """The bit class a quant's name gives: Q3_K_M and IQ3_XS -> 3, Q8_0 -> 8, F16 -> 16, TQ1_0 -> 1."""
    q = base_quant(quant)
    if q in FULL_PRECISION:
        return 32 if q == "F32" else 16
    found = re.match(r"[IT]?Q(\d)", q)
    return int(found[1]) if found else None
