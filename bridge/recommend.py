"""The recommender: the best model an experienced local-LLM user would pick for this machine, and why.

For every chat model and quant in the catalog it asks the planner (`bridge.fit`) where the model would run
at the target context, predicts how fast it writes and how long the first reply of a full context takes
(`bridge.speed`, grounded in a measurement of this machine's CPU, `bridge.calibrate`), and ranks what fits
by one score in nats. The policy, with its figures:

1. **Memory.** The model gets the RAM the planner sees as available, but never more than the total less a
   desktop reserve of max(4 GiB, 25 % of the RAM) for the OS, the browser and SillyTavern itself (the guide:
   "the biggest, least quantized model that fits in your memory, without swapping").
2. **Quality** comes from published measurements (`bridge.quality`): the model's Arena rating, moved by its
   role-play (UGI) figures, less what its quant loses (llama.cpp's KL-divergence tables). Parameter counts
   only rank sizes within a family; a mixture of experts is rated by its measured quality, never by its
   total parameters.
3. **Writing speed.** Reading speed is about 6 tokens/s (fiction is read at ~260 words/min, Brysbaert
   2019, at ~1.35 tokens a word): every e-fold of speed under it costs SLOW_NATS = 1 nat, because a reply
   slower than one reads keeps the reader waiting on every line. Under half reading speed a model is left
   out.
4. **The first reply.** A new chat, or the chat after a swap, reads the whole context first; on a CPU
   that takes minutes (the guide: ~15x slower than a GPU "especially during prompt processing"). A wait
   up to WAIT_OK_S is free; every e-fold beyond costs WAIT_NATS = 0.25 nat, a quarter of the price of
   slow writing because it is paid once per chat, not per reply (later turns reuse the cache). Over
   MAX_WAIT_S a model is left out.
5. **Placement.** On a machine with a GPU, a model that runs only partly on it pays PARTIAL_NATS = 0.35
   nats (one e-fold of parameters): its host RAM is taken from the desktop, and any other program that
   takes VRAM slows it further (fit-reference 4.8); the slower writing and first reply count above.
6. **Floors** (left out, with the reason): no 2-bit quant (the guide: "there are even 3-bit and 2-bit
   quants, but at that point you're beating a dead horse"); a 3-bit quant only where nothing at 4 bits or
   more fits (among all models for a recommendation, among the model's own quants in the quant switcher);
   F16/BF16/F32 when the model has a Q8_0 (mean KLD 0.0014 at half the size); vision and embedding models,
   which are not chat models.

Score = quality - speed cost - wait cost - placement cost; ties go to the longer context, then the faster.
Each model shows with its best quant; the best model is the pick, and every pick and runner-up says why
in the guide's terms (`bridge.reasons`).

The planner needs each file's tensor table. After `st-bridge catalog refresh` it is the exact one, read from
the file's GGUF header on the Hub; before, it is laid out from the catalog's shape and the file's size
(`estimated_layout`) and the candidate says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import fit, library, quality, reasons, speed
from .catalog import FILE_BPW, Catalog, CatalogFile, CatalogModel, base_quant, layout_from_dict
from .errors import BadRequest
from .gguf import ModelInfo, swa_layers_for
from .hardware import HardwareReport, gb, what_if

DEFAULT_CTX = 8192
GIB_MIB = 1024

# 1. memory
DESKTOP_RESERVE_MIN_MIB = 4 * GIB_MIB
DESKTOP_RESERVE_FRACTION = 0.25

# 3. writing speed
READING_TOK_S = 6.0
SLOW_NATS = 1.0
MIN_TOK_S = READING_TOK_S / 2

# 4. the first reply
WAIT_OK_S = 30.0
WAIT_NATS = 0.25
MAX_WAIT_S = 20 * 60.0

# 5. placement
PARTIAL_NATS = 0.35

# A file larger than this share of all the memory a model may have cannot fit (weights are most of a plan);
# the margin keeps files the planner might still place (page-cache weights, an embedding read by rows).
ROOM_MARGIN = 1.1

# 6. floors
MIN_BITS = 3  # no 2-bit quant, ever
GOOD_BITS = 4  # 3-bit only where nothing at 4 bits or more fits
BADGES = {"full_gpu": "GPU", "partial_gpu": "GPU+CPU", "cpu_only": "CPU", "wont_fit": "too big"}
NOT_CHAT = {
    "vision": "a vision model (language weights with an image projector): kept for describing pictures, "
              "not ranked as a chat model",
    "embedding": "an embedding model (for SillyTavern's vector storage), not a chat model",
}


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
    wait_cost: float = 0.0
    prompt_tok_s: float = 0.0  # reading a prompt that fills the context
    first_reply_s: float = 0.0  # the whole context read, then the first token
    rating: dict[str, Any] = field(default_factory=dict)  # quality.Rating.to_dict(), plus "at_quant"
    license: str | None = None
    prompt_format: str | None = None
    memory: dict[str, float] = field(default_factory=dict)  # gpu_mib, ram_mib
    left_out: str | None = None
    local_id: str | None = None  # set by `model_quants` when the file is in the models dir

    @property
    def score(self) -> float:
        return self.quality - self.speed_cost - self.wait_cost - self.placement_cost

    @property
    def badge(self) -> str:
        return BADGES.get(self.verdict, self.verdict)

    @property
    def points(self) -> float:
        """The rating this file keeps at its quant (the Arena's scale)."""
        return float(self.rating.get("at_quant", 0.0))

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["size_mib"] = round(self.size_mib)
        d["expected_tok_s"] = round(self.expected_tok_s, 1)
        d["prompt_tok_s"] = round(self.prompt_tok_s, 1)
        d["first_reply_s"] = round(self.first_reply_s, 1)
        for key in ("quality", "speed_cost", "placement_cost", "wait_cost"):
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
    speeds: str = ""  # where the CPU's speed figures come from (measured here, or estimated)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best.to_dict() if self.best else None,
            "n_ctx": self.n_ctx,
            "ram_for_model_mib": round(self.ram_for_model_mib),
            "speeds": self.speeds,
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
    cpu: speed.CpuSpeed | None = None,
) -> Recommendation:
    """Rank every catalog chat model (each at its best quant) for this machine at this context.

    `cpu`: this machine's measured CPU figures (`calibrate.cpu_speed`); None estimates them from the report.
    """
    if n_ctx < 256:
        raise BadRequest(f"a context of {n_ctx} tokens is too small to chat; use 2048 or more")
    cpu = cpu or speed.CpuSpeed.estimated(report)
    budget = budget_for(report)
    fitting: list[Candidate] = []
    left_out: list[Candidate] = []
    for model in catalog.models:
        for c in _evaluate_model(model, report, budget, n_ctx, cpu):
            (left_out if c.left_out else fitting).append(c)
    fitting, floored = three_bit_floor(fitting)
    best_per_model: dict[str, Candidate] = {}
    for c in sorted(fitting, key=_rank_key, reverse=True):
        best_per_model.setdefault(c.repo, c)
    ranked = list(best_per_model.values())
    reasons.explain_ranking(ranked, n_ctx)
    if limit:
        ranked = ranked[:limit]
    return Recommendation(
        best=ranked[0] if ranked else None,
        candidates=ranked,
        left_out=left_out + floored,
        n_ctx=n_ctx,
        ram_for_model_mib=budget.ram_usable,
        speeds=cpu.note,
    )


def _evaluate_model(model: CatalogModel, report: HardwareReport, budget: fit.Budget, n_ctx: int,
                    cpu: speed.CpuSpeed) -> list[Candidate]:
    """Every file of a model, planning only those that can be recommended: the planner is most of the
    time a recommendation takes, so a file a floor leaves out anyway, a file bigger than all the memory
    there is, or a quant bigger than one that already does not fit is left out without a plan."""
    if model.kind != "chat":
        return [_not_chat(model, f) for f in model.files]
    out: list[Candidate] = []
    too_big: Candidate | None = None
    room = sum(budget.gpu_usable) + max(budget.ram_usable, 0)
    for f in sorted(model.files, key=lambda x: x.size_bytes):
        floor = _floor(model, f)
        if floor is not None:
            out.append(_unplanned(model, f, floor, "not_planned"))
        elif too_big is not None:
            why = f"does not fit: bigger than its {too_big.quant} file, which already does not fit"
            out.append(_unplanned(model, f, why, "wont_fit"))
        elif f.size_mib > ROOM_MARGIN * room:
            kept = gb(round(desktop_reserve_mib(report)))
            why = (f"does not fit: the file alone is {gb(round(f.size_mib))}, more than the "
                   f"{gb(round(room))} this machine can give a model (keeping {kept} of RAM for the "
                   "system, browser and SillyTavern)")
            out.append(_unplanned(model, f, why, "wont_fit"))
        else:
            c = evaluate(model, f, report, budget, n_ctx, cpu)
            too_big = c if c.verdict == "wont_fit" else None
            out.append(c)
    return out


def three_bit_floor(fitting: list[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
    """3-bit quants only where nothing at 4 bits or more fits: (kept, left out with the reason)."""
    better = [c for c in fitting if (quality.nominal_bits(c.quant) or 16) >= GOOD_BITS]
    if not better:
        return fitting, []
    example = max(better, key=_rank_key)
    kept, floored = [], []
    for c in fitting:
        if (quality.nominal_bits(c.quant) or 16) < GOOD_BITS:
            c.left_out = (f"a 3-bit quant: the guide's floor is 4 bits where something better fits, and "
                          f"{example.name} fits at {example.quant}")
            floored.append(c)
        else:
            kept.append(c)
    return kept, floored


def quants(
    catalog: Catalog, repo: str, report: HardwareReport, *, n_ctx: int = DEFAULT_CTX,
    cpu: speed.CpuSpeed | None = None,
) -> list[Candidate]:
    """Every quant of one catalog model with its verdict, speed and score, smallest first. Its 3-bit
    quants are left out when one of its quants at 4 bits or more fits. A vision model is planned like a
    chat model here (someone who has it may switch its quant); an embedding model is not a chat model."""
    model = catalog.get(repo)
    budget = budget_for(report)
    cpu = cpu or speed.CpuSpeed.estimated(report)
    if model.kind == "embedding":
        return [_not_chat(model, f) for f in model.files]
    options = [evaluate(model, f, report, budget, n_ctx, cpu) for f in model.files]
    three_bit_floor([c for c in options if not c.left_out])
    return options


def best_quant(candidates: list[Candidate]) -> Candidate | None:
    """The quant to fetch when none is named: the best score among those not left out."""
    fitting = [c for c in candidates if not c.left_out]
    return max(fitting, key=_rank_key) if fitting else None


def model_quants(
    catalog: Catalog, models_dir: Path, model: str, report: HardwareReport, *, n_ctx: int = DEFAULT_CTX,
    cpu: speed.CpuSpeed | None = None, path: Path | None = None,
) -> dict[str, Any]:
    """The quant switcher: the quants of a catalog repository or of a local model's repository.

    `model` is a catalog repository (`owner/name`) or a local model id. Each quant says whether it is
    already in the models dir (its local id) or downloadable, with its verdict and speed here.
    """
    repo = find_repo(catalog, models_dir, model, path)
    if repo is None:  # a model of the folder all the same: no other quants to offer, which is no error
        note = (f"{model} is not from a catalog repository, so its other quants are unknown; "
                "`st-bridge catalog` lists the repositories it knows")
        return {"repo": None, "n_ctx": n_ctx, "best": None, "quants": [], "note": note}
    local = _local_files(models_dir, repo)
    options = quants(catalog, repo, report, n_ctx=n_ctx, cpu=cpu)
    for c in options:
        c.local_id = local.get(Path(c.file).name)
    best = best_quant(options)
    return {
        "repo": repo,
        "n_ctx": n_ctx,
        "best": best.quant if best else None,
        "quants": [c.to_dict() | {"local": c.local_id is not None} for c in options],
    }


def find_repo(catalog: Catalog, models_dir: Path, model: str, path: Path | None = None) -> str | None:
    """The catalog repository of a repository name or a local model id (`owner/name/file-stem`) whose
    file is `path` (found in `models_dir` when not given); None for a local model from no catalog
    repository (an unknown id is NotFound)."""
    if (found := catalog.find(model)) is not None:
        return found.repo
    library.check_id(model)
    parts = model.split("/")
    if len(parts) >= 3 and (found := catalog.find("/".join(parts[:2]))) is not None:
        return found.repo
    name = (path or library.resolve(models_dir, model).path).name
    for m in catalog.models:
        if any(p.path.endswith(name) for f in m.files for p in f.parts):
            return m.repo
    return None


def _local_files(models_dir: Path, repo: str) -> dict[str, str]:
    """File name -> local model id of the GGUF files downloaded from `repo`."""
    prefix = repo.lower() + "/"
    found = {}
    for m in library.scan(models_dir):
        if m.id.lower().startswith(prefix):
            found[m.path.name] = m.id
    return found


def _rank_key(c: Candidate) -> tuple[float, float, float]:
    return (c.score, c.n_ctx, c.expected_tok_s)


# --- one candidate -------------------------------------------------------------------------------------


def evaluate(
    model: CatalogModel, f: CatalogFile, report: HardwareReport, budget: fit.Budget, n_ctx: int,
    cpu: speed.CpuSpeed | None = None,
) -> Candidate:
    cpu = cpu or speed.CpuSpeed.estimated(report)
    layout, source = planner_input(model, f)
    ctx = min(n_ctx, layout.info.n_ctx_train or n_ctx)
    verdict, bd = fit.choose(layout, fit.FitParams(n_ctx=ctx), budget)
    plan = fit.Plan(verdict, "", bd, None, None, ctx, model.name, budget)
    fits = verdict != "wont_fit"
    reason = fit.explain(plan) if fits else _too_big(bd, budget, report)
    predicted = speed.predict(speed.ModelCost.of(layout), bd, report, cpu) if fits else None
    rated = quality.rating(model)
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
        expected_tok_s=predicted.decode_tok_s if predicted else 0.0,
        prompt_tok_s=predicted.prompt_tok_s if predicted else 0.0,
        first_reply_s=predicted.first_reply_s if predicted else math.inf,
        quality=quality.quality_nats(model, f.quant, bd.kv_type_k),
        rating=rated.to_dict() | {"at_quant": round(quality.points_at(model, f.quant, bd.kv_type_k), 1)},
        placement_cost=PARTIAL_NATS if report.usable_gpus and verdict != "full_gpu" else 0.0,
        reason=reason,
        planner_input=source,
        license=model.license,
        prompt_format=model.prompt_format,
        memory={"gpu_mib": round(sum(d.total_mib for d in bd.gpus)), "ram_mib": round(bd.host.total_mib)},
    )
    c.speed_cost = speed_cost(c.expected_tok_s)
    c.wait_cost = wait_cost(c.first_reply_s)
    c.left_out = _exclusion(model, f, c)
    return c


def _not_chat(model: CatalogModel, f: CatalogFile) -> Candidate:
    why = NOT_CHAT.get(model.kind, f"a {model.kind} model, not a chat model")
    return _unplanned(model, f, why, "not_ranked")


def _unplanned(model: CatalogModel, f: CatalogFile, why: str, verdict: str) -> Candidate:
    """A file left out before planning it: `why` says what left it out."""
    return Candidate(
        repo=model.repo, name=model.name, file=f.file, quant=f.quant, params_b=model.params_b,
        active_params_b=model.active_params_b, size_mib=f.size_mib, size_exact=f.exact, verdict=verdict,
        gpu_layers=0, n_layer=0, n_ctx=0, kv_type="f16", expected_tok_s=0.0, quality=0.0, reason=why,
        planner_input="none", left_out=why, first_reply_s=math.inf,
    )


def _too_big(bd: fit.Breakdown, budget: fit.Budget, report: HardwareReport) -> str:
    kept = gb(round(desktop_reserve_mib(report)))
    return (
        f"does not fit: at {bd.n_ctx} tokens of context it needs {gb(round(bd.host.total_mib))} of RAM "
        f"and {gb(max(0, round(budget.ram_usable)))} is usable (keeping {kept} for the system, browser "
        "and SillyTavern)"
    )


def speed_cost(tok_s: float) -> float:
    """Nats for writing slower than one reads (policy 3)."""
    if tok_s <= 0:
        return math.inf
    return SLOW_NATS * max(0.0, math.log(READING_TOK_S / tok_s))


def wait_cost(first_reply_s: float) -> float:
    """Nats for a first reply (a full context read) that takes longer than WAIT_OK_S (policy 4)."""
    if not math.isfinite(first_reply_s):
        return math.inf
    return WAIT_NATS * max(0.0, math.log(max(first_reply_s, 1e-9) / WAIT_OK_S))


def bits_per_weight(model: CatalogModel, f: CatalogFile) -> float:
    return (
        f.size_bytes * 8 / (model.params_b * 1e9) if model.params_b else FILE_BPW.get(base_quant(f.quant), 0)
    )


def _floor(model: CatalogModel, f: CatalogFile) -> str | None:
    """Why this quant is never recommended, whatever the machine (policy 6); None if it may be."""
    bits = quality.nominal_bits(f.quant)
    if bits is not None and bits < MIN_BITS:
        return (
            f"a {bits}-bit quant ({bits_per_weight(model, f):.1f} bits per weight): never recommended "
            "(the guide: at that point \"you're beating a dead horse\"; mean KLD "
            f"{quality.QUANT_KLD.get(base_quant(f.quant), 0):.2f} vs 0.03 at Q4_K_M on Llama-3-8B)"
        )
    if base_quant(f.quant) in quality.FULL_PRECISION and any(x.quant.upper() == "Q8_0" for x in model.files):
        return "Q8_0 of this model is as good (mean KLD 0.0014) at half the size"
    return None


def _exclusion(model: CatalogModel, f: CatalogFile, c: Candidate) -> str | None:
    if c.verdict == "wont_fit":
        return c.reason
    floor = _floor(model, f)
    if floor is not None:
        return floor
    if c.expected_tok_s < MIN_TOK_S:
        return (
            f"about {c.expected_tok_s:.1f} tokens/s expected, under half reading speed "
            f"({MIN_TOK_S:g} tokens/s): too slow to chat"
        )
    if c.first_reply_s > MAX_WAIT_S:
        return (
            f"the first reply of a new chat would come after {speed.describe_wait(c.first_reply_s)} "
            f"(reading {c.n_ctx} tokens at ~{c.prompt_tok_s:.0f} tokens/s): too long to wait"
        )
    return None


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


