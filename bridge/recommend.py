"""The recommender: the biggest, least-quantized model that runs well on this machine, with speed and reasons.

For every (model, quant) in the catalog it asks the planner (`bridge.fit`) where the model would run at the
target context, predicts the decode speed from memory bandwidth, and ranks what fits by one score in nats
(fit-reference.md 3.3 and 5.5). The policy, with its figures:

1. **Memory.** The model gets the RAM the planner sees as available, but never more than the total less a
   desktop reserve of max(4 GiB, 25 % of the RAM) for the OS, the browser and SillyTavern itself (the guide:
   "the biggest, least quantized model that fits in your memory, without swapping"). A 16 GB machine gives a
   model 12 GiB, a 32 GB one 24 GiB.
2. **Quality** = SIZE_NATS x ln(parameters) - quant loss. 0.36 nats per e-fold of parameters is the
   Llama-3 8B -> 70B perplexity ratio (fit-reference 3.3). The quant loss is the mean KL divergence from F16
   measured on Llama-3-8B (llama.cpp tools/perplexity/README.md), x0.4 for models trained before 2024 (they
   lose 2.5-4x less, PR #6936), and weighted x3 for models of 14B and under. That weight is a policy choice,
   not a measurement: perplexity and KLD understate what quantization costs in coherence, most for small
   models (fit-reference 3.3 caveats), and the guide's "least quantized" matters most where there is least
   to spare. With x1 a 9B at Q4_K_M and an 8B at Q5_K_M tie within 0.03 nats; with x3 the 8B at Q5_K_M
   wins by 0.02. A q8_0 KV cache costs 0.00155 nats (llama.cpp#7412). MoE quality follows total
   parameters, speed the active ones (Mixtral 8x7B: 46.7B for quality, 12.9B for speed).
3. **Speed.** Decode time per token = bytes read on each device / (0.7 x its memory bandwidth), the
   bytes being the weights a token uses (active experts only) plus half the KV cache (a chat midway).
   Reading speed is about 6 tokens/s (fiction is read at ~260 words/min, Brysbaert 2019, at ~1.35
   tokens a word): every e-fold of speed under it costs SLOW_NATS = 1 nat, a steep price, because a reply
   that writes slower than one reads keeps the reader waiting on every line. Under half reading speed a
   model is left out.
4. **Placement.** On a machine with a GPU, a model that runs only partly on it (layers or experts in RAM) pays
   PARTIAL_NATS = 0.35 nats, i.e. it has to be e^(0.35/0.36) = 2.6x the parameters of a model that runs
   fully on the GPU to be preferred. The decode estimate already shows the CPU part's bandwidth limit; this
   term stands for what it does not show: prompt processing of the CPU layers (the guide: CPU is ~15x slower
   "especially during prompt processing"), host RAM taken from the desktop, and the speed lost to any other
   program that takes VRAM (fit-reference 4.8).
5. **Floors** (left out, with the reason): under 2.2 bits per weight for any model; for models of 14B and
   under, 3-bit and 2-bit quants (the guide: "there are 3-bit and 2-bit quants, but at that point you're
   beating a dead horse"; on Llama-3-8B the loss jumps from 0.036 at IQ4_XS to 0.087 at Q3_K_L); F16/BF16/F32
   when the model has a Q8_0 (mean KLD 0.0014 at half the size).

Score = quality - speed cost - placement cost; ties go to the longer context, then the faster. Each model
shows with its best quant; the best model is the pick and the others are runners-up, each with the reason
it ranks lower.

The planner needs each file's tensor table. After `st-bridge catalog refresh` it is the exact one, read from
the file's GGUF header on the Hub; before, it is laid out from the catalog's shape and the file's size
(`estimated_layout`) and the candidate says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import fit, library
from .catalog import FILE_BPW, Catalog, CatalogFile, CatalogModel, base_quant, layout_from_dict
from .errors import BadRequest, NotFound
from .gguf import ModelInfo, swa_layers_for
from .hardware import HardwareReport, estimate_cpu_bandwidth, gb, what_if

DEFAULT_CTX = 8192
GIB_MIB = 1024

# 1. memory
DESKTOP_RESERVE_MIN_MIB = 4 * GIB_MIB
DESKTOP_RESERVE_FRACTION = 0.25

# 2. quality
SIZE_NATS = 0.36
SMALL_MODEL_B = 14.5  # "14B and under", with room for 14.x-billion counts
SMALL_MODEL_LOSS_WEIGHT = 3.0
KV_LOSS = {"f16": 0.0, "q8_0": 0.00155}  # mean KLD, Llama-3-8B (llama.cpp#7412)

# 3. speed
READING_TOK_S = 6.0
SLOW_NATS = 1.0
MIN_TOK_S = READING_TOK_S / 2
BANDWIDTH_EFFICIENCY = 0.7  # decode reaches 60-80 % of peak memory bandwidth (fit-reference 5.5.3)
DEFAULT_GPU_BANDWIDTH_GBS = 448.0  # a mid-range card, when NVML could not tell

# 4. placement
PARTIAL_NATS = 0.35

# 5. floors
FLOOR_ANY_BPW = 2.2
SMALL_MODEL_MIN_BITS = 4

# Mean KL divergence vs F16 logits, Llama-3-8B, wikitext-2 (llama.cpp tools/perplexity/README.md).
# IQ3_XS, IQ3_S, IQ2_S, Q2_K_S, Q4_1, Q5_0, Q5_1 are not in that table: interpolated between neighbours
# by bits per weight, on a log scale.
QUANT_KLD: dict[str, float] = {
    "F32": 0.0,
    "F16": 0.0,
    "BF16": 0.0,
    "Q8_0": 0.0014,
    "Q6_K": 0.0055,
    "Q5_K_M": 0.0108,
    "Q5_K_S": 0.0166,
    "Q5_1": 0.0140,
    "Q5_0": 0.0190,
    "Q4_K_M": 0.0313,
    "Q4_K_S": 0.0431,
    "IQ4_NL": 0.0357,
    "IQ4_XS": 0.0363,
    "Q4_1": 0.0550,
    "Q4_0": 0.0719,
    "Q3_K_L": 0.087,
    "Q3_K_M": 0.102,
    "IQ3_M": 0.103,
    "IQ3_S": 0.120,
    "IQ3_XS": 0.150,
    "IQ3_XXS": 0.184,
    "Q3_K_S": 0.228,
    "Q2_K": 0.445,
    "Q2_K_S": 0.500,
    "IQ2_M": 0.326,
    "IQ2_S": 0.430,
    "IQ2_XS": 0.546,
    "IQ2_XXS": 0.812,
    "IQ1_M": 1.39,
    "IQ1_S": 2.21,
}
# bartowski's _L / _XL files keep embeddings and output at Q8_0: a little better than the plain recipe.
VARIANT_BONUS = 0.9
FULL_PRECISION = frozenset({"F32", "F16", "BF16"})
BADGES = {"full_gpu": "GPU", "partial_gpu": "GPU+CPU", "cpu_only": "CPU", "wont_fit": "too big"}


@dataclass
class Candidate:
    repo: str
    name: str
    file: str
    quant: str
    params_b: float
    active_params_b: float
    size_mib: float
    size_exact: bool
    verdict: str
    gpu_layers: int
    n_layer: int
    n_ctx: int
    kv_type: str
    expected_tok_s: float
    quality: float
    reason: str
    planner_input: str  # "header" (exact tensor table) or "estimated" (from the catalog shape and size)
    n_cpu_moe: int = 0
    speed_cost: float = 0.0
    placement_cost: float = 0.0
    license: str | None = None
    prompt_format: str | None = None
    memory: dict[str, float] = field(default_factory=dict)  # gpu_mib, ram_mib
    left_out: str | None = None
    local_id: str | None = None  # set by `model_quants` when the file is in the models dir

    @property
    def score(self) -> float:
        return self.quality - self.speed_cost - self.placement_cost

    @property
    def badge(self) -> str:
        return BADGES.get(self.verdict, self.verdict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["size_mib"] = round(self.size_mib)
        d["expected_tok_s"] = round(self.expected_tok_s, 1)
        for key in ("quality", "speed_cost", "placement_cost"):
            d[key] = round(d[key], 4)
        d["score"] = round(self.score, 4)
        d["badge"] = self.badge
        return d


@dataclass
class Recommendation:
    best: Candidate | None
    candidates: list[Candidate]  # fitting, best first: one per model (its best quant)
    left_out: list[Candidate]  # with `left_out` saying why
    n_ctx: int
    ram_for_model_mib: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best.to_dict() if self.best else None,
            "n_ctx": self.n_ctx,
            "ram_for_model_mib": round(self.ram_for_model_mib),
            "candidates": [c.to_dict() for c in self.candidates],
            "left_out": [
                {"repo": c.repo, "file": c.file, "quant": c.quant, "verdict": c.verdict, "reason": c.left_out}
                for c in self.left_out
            ],
        }


# --- the machine ---------------------------------------------------------------------------------------


def desktop_reserve_mib(report: HardwareReport) -> float:
    return max(DESKTOP_RESERVE_MIN_MIB, DESKTOP_RESERVE_FRACTION * report.ram_total_mib)


def budget_for(report: HardwareReport) -> fit.Budget:
    """The planner's budget with the desktop reserve kept out of the RAM (policy 1)."""
    budget = fit.budget_for(report)
    ram = min(budget.ram_usable, report.ram_total_mib - desktop_reserve_mib(report))
    return replace(budget, ram_usable=ram)


def what_if_machine(report: HardwareReport, gpu_mib: list[int] | None, ram_mib: int | None) -> HardwareReport:
    """This machine with `gpu_mib` of VRAM and `ram_mib` of RAM (`--gpu-mib` / `--ram-mib`).

    `ram_mib` is the machine's RAM, as a user states it ("16 GB"): nothing else running yet, and the
    desktop reserve comes out of it like on a real machine of that size.
    """
    machine = what_if(report, gpu_mib, ram_mib)
    if ram_mib is not None:
        machine.ram_total_mib = ram_mib
    return machine


# --- ranking -------------------------------------------------------------------------------------------


def recommend(
    catalog: Catalog,
    report: HardwareReport,
    *,
    n_ctx: int = DEFAULT_CTX,
    limit: int | None = None,
) -> Recommendation:
    """Rank every catalog (model, quant) for this machine at this context."""
    if n_ctx < 256:
        raise BadRequest(f"a context of {n_ctx} tokens is too small to chat; use 2048 or more")
    budget = budget_for(report)
    fitting: list[Candidate] = []
    left_out: list[Candidate] = []
    for model in catalog.models:
        for f in model.files:
            c = evaluate(model, f, report, budget, n_ctx)
            (left_out if c.left_out else fitting).append(c)
    best_per_model: dict[str, Candidate] = {}
    for c in sorted(fitting, key=_rank_key, reverse=True):
        best_per_model.setdefault(c.repo, c)
    ranked = list(best_per_model.values())
    _explain_ranking(ranked)
    if limit:
        ranked = ranked[:limit]
    return Recommendation(
        best=ranked[0] if ranked else None,
        candidates=ranked,
        left_out=left_out,
        n_ctx=n_ctx,
        ram_for_model_mib=budget.ram_usable,
    )


def quants(
    catalog: Catalog, repo: str, report: HardwareReport, *, n_ctx: int = DEFAULT_CTX
) -> list[Candidate]:
    """Every quant of one catalog model with its verdict, speed and score, smallest first."""
    model = catalog.get(repo)
    budget = budget_for(report)
    return [evaluate(model, f, report, budget, n_ctx) for f in model.files]


def best_quant(candidates: list[Candidate]) -> Candidate | None:
    """The quant to fetch when none is named: the best score among those not left out."""
    fitting = [c for c in candidates if not c.left_out]
    return max(fitting, key=_rank_key) if fitting else None


def model_quants(
    catalog: Catalog, models_dir: Path, model: str, report: HardwareReport, *, n_ctx: int = DEFAULT_CTX
) -> dict[str, Any]:
    """The quant switcher: the quants of a catalog repository or of a local model's repository.

    `model` is a catalog repository (`owner/name`) or a local model id. Each quant says whether it is
    already in the models dir (its local id) or downloadable, with its verdict and speed here.
    """
    repo = repo_of(catalog, models_dir, model)
    local = _local_files(models_dir, repo)
    options = quants(catalog, repo, report, n_ctx=n_ctx)
    for c in options:
        c.local_id = local.get(Path(c.file).name)
    best = best_quant(options)
    return {
        "repo": repo,
        "n_ctx": n_ctx,
        "best": best.quant if best else None,
        "quants": [c.to_dict() | {"local": c.local_id is not None} for c in options],
    }


def repo_of(catalog: Catalog, models_dir: Path, model: str) -> str:
    """The catalog repository of a repository name or a local model id (`owner/name/file-stem`)."""
    if (found := catalog.find(model)) is not None:
        return found.repo
    library.check_id(model)
    parts = model.split("/")
    if len(parts) >= 3 and (found := catalog.find("/".join(parts[:2]))) is not None:
        return found.repo
    name = Path(library.resolve(models_dir, model).path).name
    for m in catalog.models:
        if any(p.path.endswith(name) for f in m.files for p in f.parts):
            return m.repo
    raise NotFound(
        f"{model} is not from a catalog repository, so its other quants are unknown; "
        "`st-bridge catalog` lists the repositories it knows",
        model=model,
    )


def _local_files(models_dir: Path, repo: str) -> dict[str, str]:
    """File name -> local model id of the GGUF files downloaded from `repo`."""
    prefix = repo.lower() + "/"
    found = {}
    for m in library.scan(models_dir):
        if m.id.lower().startswith(prefix):
            found[m.path.name] = m.id
    return found


# --- one candidate -------------------------------------------------------------------------------------


def evaluate(
    model: CatalogModel, f: CatalogFile, report: HardwareReport, budget: fit.Budget, n_ctx: int
) -> Candidate:
    layout, source = planner_input(model, f)
    ctx = min(n_ctx, layout.info.n_ctx_train or n_ctx)
    verdict, bd = fit.choose(layout, fit.FitParams(n_ctx=ctx), budget)
    plan = fit.Plan(verdict, "", bd, None, None, ctx, model.name, budget)
    reason = fit.explain(plan) if verdict != "wont_fit" else _too_big(bd, budget, report)
    embd_mib = 0 if layout.info.tied_output else layout.token_embd / fit.MIB
    tok_s = expected_tok_s(bd, model, report, embd_mib) if verdict != "wont_fit" else 0.0
    c = Candidate(
        repo=model.repo,
        name=model.name,
        file=f.file,
        quant=f.quant,
        params_b=model.params_b,
        active_params_b=model.active_params_b,
        size_mib=f.size_mib,
        size_exact=f.exact,
        verdict=verdict,
        gpu_layers=bd.gpu_layers,
        n_layer=bd.n_layer,
        n_ctx=bd.n_ctx,
        kv_type=bd.kv_type_k,
        n_cpu_moe=bd.n_cpu_moe,
        expected_tok_s=tok_s,
        quality=quality(model, f, bd.kv_type_k),
        speed_cost=speed_cost(tok_s),
        placement_cost=PARTIAL_NATS if report.usable_gpus and verdict != "full_gpu" else 0.0,
        reason=reason,
        planner_input=source,
        license=model.license,
        prompt_format=model.prompt_format,
        memory={"gpu_mib": round(sum(d.total_mib for d in bd.gpus)), "ram_mib": round(bd.host.total_mib)},
    )
    c.left_out = _exclusion(model, f, c)
    return c


def _too_big(bd: fit.Breakdown, budget: fit.Budget, report: HardwareReport) -> str:
    kept = gb(round(desktop_reserve_mib(report)))
    return (
        f"does not fit: at {bd.n_ctx} tokens of context it needs {gb(round(bd.host.total_mib))} of RAM "
        f"and {gb(max(0, round(budget.ram_usable)))} is usable (keeping {kept} for the system, browser "
        "and SillyTavern)"
    )


def quant_loss(model: CatalogModel, quant: str) -> float:
    """Nats per token lost to the weights' quantization (policy 2)."""
    q = quant.upper()
    kld = QUANT_KLD.get(q)
    if kld is None:
        kld = QUANT_KLD.get(base_quant(q), QUANT_KLD["Q2_K"]) * VARIANT_BONUS
    weight = SMALL_MODEL_LOSS_WEIGHT if model.params_b <= SMALL_MODEL_B else 1.0
    return weight * model.quant_sensitivity * kld


def quality(model: CatalogModel, f: CatalogFile, kv_type: str = "f16") -> float:
    size = SIZE_NATS * math.log(max(model.params_b, 0.01))
    return size - quant_loss(model, f.quant) - KV_LOSS.get(kv_type, 0.0)


def speed_cost(tok_s: float) -> float:
    """Nats for writing slower than one reads (policy 3)."""
    if tok_s <= 0:
        return math.inf
    return SLOW_NATS * max(0.0, math.log(READING_TOK_S / tok_s))


def bits_per_weight(model: CatalogModel, f: CatalogFile) -> float:
    return (
        f.size_bytes * 8 / (model.params_b * 1e9) if model.params_b else FILE_BPW.get(base_quant(f.quant), 0)
    )


def nominal_bits(quant: str) -> int | None:
    """The bit class a quant's name gives: Q3_K_M and IQ3_XS -> 3, Q8_0 -> 8, F16 -> 16."""
    q = base_quant(quant)
    if q in FULL_PRECISION:
        return 32 if q == "F32" else 16
    found = re.match(r"I?Q(\d)", q)
    return int(found[1]) if found else None


def expected_tok_s(
    bd: fit.Breakdown, model: CatalogModel, report: HardwareReport, embd_mib: float = 0
) -> float:
    """Decode speed: every token reads the weights it uses and half the context's KV cache (a chat midway).

    The token embedding (on the host) is read one row per token, so it does not count, unless the output
    layer shares it (tied embeddings).
    """
    active = model.active_params_b / model.params_b if model.params_b else 1.0
    seconds = 0.0
    for dev, gpu in zip(bd.gpus, report.usable_gpus, strict=False):
        bw = (gpu.bandwidth_gbs or DEFAULT_GPU_BANDWIDTH_GBS) * 1e9 * BANDWIDTH_EFFICIENCY
        seconds += (dev.weights_mib * active + dev.kv_mib / 2) * fit.MIB / bw
    cpu_bw = (report.cpu_bandwidth_gbs or estimate_cpu_bandwidth(report.cpu.cores_physical)) * 1e9
    seconds += (
        (max(bd.host.weights_mib - embd_mib, 0) * active + bd.host.kv_mib / 2)
        * fit.MIB
        / (cpu_bw * BANDWIDTH_EFFICIENCY)
    )
    return 1.0 / seconds if seconds > 0 else 0.0


def _exclusion(model: CatalogModel, f: CatalogFile, c: Candidate) -> str | None:
    if c.verdict == "wont_fit":
        return c.reason
    bpw = bits_per_weight(model, f)
    if bpw < FLOOR_ANY_BPW:
        return f"{bpw:.1f} bits per weight is under the {FLOOR_ANY_BPW} floor: too much quality lost"
    bits = nominal_bits(f.quant)
    if model.params_b <= SMALL_MODEL_B and bits is not None and bits < SMALL_MODEL_MIN_BITS:
        return (
            f"a {bits}-bit quant of a {model.params_b:g}B model: small models lose too much under 4 bits "
            f"(mean KLD {QUANT_KLD.get(base_quant(f.quant), 0):.3f} vs 0.036 at IQ4_XS on Llama-3-8B)"
        )
    if base_quant(f.quant) in FULL_PRECISION and any(x.quant.upper() == "Q8_0" for x in model.files):
        return "Q8_0 of this model is as good (mean KLD 0.0014) at half the size"
    if c.expected_tok_s < MIN_TOK_S:
        return (
            f"about {c.expected_tok_s:.1f} tokens/s expected, under half reading speed "
            f"({MIN_TOK_S:g} tokens/s): too slow to chat"
        )
    return None


def _rank_key(c: Candidate) -> tuple[float, float, float]:
    return (c.score, c.n_ctx, c.expected_tok_s)


# --- reasons -------------------------------------------------------------------------------------------


def _explain_ranking(ranked: list[Candidate]) -> None:
    if not ranked:
        return
    top = ranked[0]
    top.reason = f"best pick: {_describe(top)}; {top.reason}"
    for c in ranked[1:]:
        c.reason = f"runner-up ({_why_lower(c, top)}): {_describe(c)}; {c.reason}"


def _why_lower(c: Candidate, top: Candidate) -> str:
    """The term of the score that puts `c` under the best pick, in words."""
    bigger = c.params_b > top.params_b
    if c.placement_cost > top.placement_cost and bigger:
        return (
            f"bigger, but only partly on the GPU (~{c.expected_tok_s:.0f} vs ~{top.expected_tok_s:.0f} "
            f"tokens/s): worth it only at {math.exp(PARTIAL_NATS / SIZE_NATS):.1f}x the parameters"
        )
    if c.speed_cost > top.speed_cost + 0.01:
        return (
            f"{'bigger, but ' if bigger else ''}writes ~{c.expected_tok_s:.1f} tokens/s, slower than "
            f"reading speed (~{READING_TOK_S:g})"
        )
    if c.placement_cost > top.placement_cost:
        return "only partly on the GPU"
    if bigger:
        return f"bigger, but more quantized: {c.quant} loses more than it gains"
    if c.params_b < top.params_b:
        return "smaller"
    return "as good, another model" if c.quant == top.quant else f"same size, at {c.quant}"


def _describe(c: Candidate) -> str:
    size = f"{c.params_b:g}B" + (
        f" ({c.active_params_b:g}B active)" if c.active_params_b < c.params_b else ""
    )
    where = {
        "full_gpu": "fully on the GPU",
        "partial_gpu": "partly on the GPU",
        "cpu_only": "on the CPU",
    }.get(c.verdict, c.verdict)
    return f"{c.name}, {size} at {c.quant}, {where}, ~{c.expected_tok_s:.0f} tokens/s"


# --- the planner's input -------------------------------------------------------------------------------


def planner_input(model: CatalogModel, f: CatalogFile) -> tuple[fit.ModelLayout, str]:
    read = model.headers.get(f.file)
    if read:
        return layout_from_dict(read), "header"
    return estimated_layout(model, f), "estimated"


# Without a shape (no config read): a llama-like guess from the parameter count, so the model can still be
# ranked; every figure that comes from here is marked estimated in the candidate.
def _guess_shape(params_b: float) -> dict[str, int]:
    n_layer = 32 if params_b < 10 else 40 if params_b < 16 else 64 if params_b < 40 else 80
    n_embd = 4096 if params_b < 10 else 5120 if params_b < 40 else 8192
    return {
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_head": n_embd // 128,
        "n_head_kv": 8,
        "n_ff": int(params_b * 1e9 / n_layer / n_embd / 3 * 0.85),
        "n_vocab": 152064,
        "head_dim": 128,
    }


def estimated_layout(model: CatalogModel, f: CatalogFile) -> fit.ModelLayout:
    """A tensor table laid out from the catalog shape, scaled so the bytes add up to the file's size."""
    s = model.shape
    g = _guess_shape(model.params_b) if not s.complete else {}
    n_layer = s.n_layer or g["n_layer"]
    n_embd = s.n_embd or g["n_embd"]
    n_head = s.n_head or g["n_head"]
    n_head_kv = s.n_head_kv or g["n_head_kv"]
    head_dim = s.kv_head_dim or g["head_dim"]
    n_ff = s.n_ff or g["n_ff"]
    n_vocab = s.n_vocab or g["n_vocab"]
    n_expert = max(s.n_expert, 1)
    total = f.size_bytes
    bpw = total * 8 / (model.params_b * 1e9) if model.params_b else 4.9
    embd = int(n_vocab * n_embd * bpw / 8)
    output = 0 if s.tied_embeddings else embd
    per_layer = max(total - embd - output, 0) / n_layer
    attn_w = n_embd * head_dim * (2 * n_head + 2 * n_head_kv)
    ffn_w = 3 * n_embd * n_ff * n_expert
    share = attn_w / (attn_w + ffn_w)
    block = [
        fit.Matrix(int(per_layer * share), n_head * head_dim, False, True),
        fit.Matrix(int(per_layer * (1 - share)), n_ff, n_expert > 1, True),
    ]
    info = ModelInfo(
        architecture=s.architecture or "llama",
        name=model.name,
        n_params=int(model.params_b * 1e9),
        n_params_active=int(model.active_params_b * 1e9),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=[n_head] * n_layer,
        n_head_kv=[n_head_kv] * n_layer,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        n_ff=[n_ff] * n_layer,
        n_vocab=n_vocab,
        n_ctx_train=model.context_length or s.n_ctx_train or 8192,
        n_expert=s.n_expert,
        n_expert_used=s.n_expert_used,
        sliding_window=s.sliding_window or 0,
        swa_layers=swa_layers_for(None, s.architecture or "", n_layer, s.sliding_window or 0),
        tied_output=s.tied_embeddings,
        file_type=base_quant(f.quant),
        size_bytes=total,
    )
    out = [fit.Matrix(output, n_vocab, False, False)] if output else []
    return fit.ModelLayout(info, [list(block) for _ in range(n_layer)], out, embd, 0, total)


