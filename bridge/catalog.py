"""The catalog: well-known chat and role-play GGUF repositories, their quant files and each figure's source.

The bundled `data/catalog.json` is built from surveys of Hugging Face pages (`build_from_seed`, run by
`scripts/build_catalog.py`): file sizes as the Hub printed them (decimal GB, three significant figures, so
each size carries its precision), the architecture shape from each model's config.json, license and prompt
format from the model card, and each model's published quality figures (`quality`: its Arena rating and
its UGI role-play figures, each with its source; `bridge.quality` reads them). A figure that no page gave
is computed from the shape and the quant's rules, or from a related model, and marked `"estimated": true`
with its reason.

Besides chat models the catalog holds vision models (`kind: "vision"`, their projector files in
`projectors`, apart from the language weights in `files`) and embedding models (`kind: "embedding"`):
the recommender ranks chat models only.

`refresh` replaces survey figures with exact ones from the Hub: sizes and sha256 from
`model_info(files_metadata=True)`, and each file's GGUF header read by range requests (the planner's exact
input). The result is cached in the data dir with a time-to-live; offline, the bundled catalog serves.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from . import files as file_ops
from . import fit, gguf
from .errors import BridgeError, NotFound
from .formats import parse_name

CACHE_NAME = "catalog-cache.json"
DEFAULT_TTL_S = 24 * 3600
DISCOVER_PER_AUTHOR = 10  # an uploader's most downloaded GGUF repositories a refresh may add
SCHEMA = 2  # 2: kind, quality, projectors; a cache of schema 1 is ignored (the bundle serves)
KINDS = ("chat", "vision", "embedding")

# Bits per weight of whole files (tensor mixtures), Llama-3.1-8B column of ggml-org/llama.cpp
# tools/quantize/README.md (fit-reference.md 3.1). Used only to estimate a size no page gave.
FILE_BPW: dict[str, float] = {
    "IQ1_S": 2.00,
    "IQ1_M": 2.15,
    "IQ2_XXS": 2.38,
    "IQ2_XS": 2.59,
    "IQ2_S": 2.74,
    "IQ2_M": 2.93,
    "Q2_K_S": 2.97,
    "Q2_K": 3.16,
    "IQ3_XXS": 3.25,
    "IQ3_XS": 3.50,
    "IQ3_S": 3.66,
    "IQ3_M": 3.76,
    "Q3_K_S": 3.64,
    "Q3_K_M": 4.00,
    "Q3_K_L": 4.30,
    "IQ4_XS": 4.46,
    "IQ4_NL": 4.68,
    "Q4_0": 4.64,
    "Q4_1": 5.11,
    "Q4_K_S": 4.67,
    "Q4_K_M": 4.89,
    "Q5_K_S": 5.57,
    "Q5_K_M": 5.70,
    "Q6_K": 6.56,
    "Q8_0": 8.50,
    "F16": 16.0,
    "BF16": 16.0,
    "F32": 32.0,
}


def base_quant(quant: str) -> str:
    """The ggml file type behind an uploader's variant name: Q4_K_L -> Q4_K_M, Q4_0_8_8 -> Q4_0.

    bartowski's `_L` / `_XL` files are the `_M` recipe with Q8_0 embeddings and output; `Q4_0_x_y` are
    Q4_0 repacked for ARM; `UD-` is Unsloth's dynamic recipe of the same type.
    """
    q = quant.upper().removeprefix("UD-")
    if q.startswith("Q4_0_"):
        return "Q4_0"
    if q in ("Q2_K_L",):
        return "Q2_K"
    if q.endswith("_K_L") and q != "Q3_K_L":
        return q[:-1] + "M"
    if q.endswith("_K_XL"):
        return q[:-2] + "L" if q.startswith("Q3") else q[:-2] + "M"
    return q


@dataclass
class Part:
    path: str
    size_bytes: int
    size_tolerance_bytes: int = 0  # 0: exact (from the Hub API); else ± half the last printed digit
    sha256: str | None = None


@dataclass
class CatalogFile:
    """One quant of one model: a single file, or the shards of a split model as one unit."""

    quant: str
    parts: list[Part]
    source: str  # hub_api | hf_tree | hf_blob | card | estimated
    source_url: str | None = None
    estimated: bool = False
    note: str | None = None

    @property
    def file(self) -> str:
        return self.parts[0].path

    @property
    def size_bytes(self) -> int:
        return sum(p.size_bytes for p in self.parts)

    @property
    def size_mib(self) -> float:
        return self.size_bytes / 2**20

    @property
    def exact(self) -> bool:
        return all(p.size_tolerance_bytes == 0 for p in self.parts) and not self.estimated


@dataclass
class Projector:
    """A vision projector (`mmproj`): passed to llama.cpp beside the language weights of its model."""

    path: str
    size_bytes: int
    size_tolerance_bytes: int
    source: str
    source_url: str | None = None
    quant: str | None = None  # None: the listing did not say
    for_model: str | None = None  # the model it belongs to, when the repository holds several
    note: str | None = None


@dataclass
class Shape:
    """The architecture figures the recommender needs (from config.json, or from the GGUF header)."""

    architecture: str | None = None
    n_layer: int | None = None
    n_embd: int | None = None
    n_ff: int | None = None
    n_head: int | None = None
    n_head_kv: int | None = None
    head_dim: int | None = None
    n_vocab: int | None = None
    n_expert: int = 0
    n_expert_used: int = 0
    sliding_window: int | None = None
    n_ctx_train: int | None = None
    tied_embeddings: bool = False
    source_url: str | None = None
    estimated: bool = False  # copied from the base model, not read for this repo
    note: str | None = None

    @property
    def complete(self) -> bool:
        return None not in (self.n_layer, self.n_embd, self.n_ff, self.n_head, self.n_head_kv, self.n_vocab)

    @property
    def kv_head_dim(self) -> int | None:
        if self.head_dim:
            return self.head_dim
        if self.n_embd and self.n_head:
            return self.n_embd // self.n_head
        return None

@dataclass
class CatalogModel:
    repo: str
    name: str
    params_b: float
    params_estimated: bool
    active_params_b: float
    license: str | None
    prompt_format: str | None
    context_length: int | None
    base_model: str | None
    shape: Shape
    files: list[CatalogFile]
    quant_sensitivity: float = 1.0  # x the Llama-3-8B quant loss; ~0.4 for Llama-2-era training
    sources: dict[str, str | None] = field(default_factory=dict)
    notes: str | None = None
    headers: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> layout_to_dict (range read)
    source: str = "survey"  # survey (the bundled catalog) | discovered (a trusted uploader's, by a refresh)
    kind: str = "chat"  # chat | vision | embedding (KINDS)
    quality: dict[str, Any] = field(default_factory=dict)  # {"arena": {...}, "ugi": {...}}: bridge.quality
    projectors: list[Projector] = field(default_factory=list)  # vision: the mmproj files in this repository
    projector_hint: dict[str, Any] | None = None  # a projector for this model kept in another repository
    embedding: dict[str, Any] | None = None  # embedding: dim, pooling, prefixes, as far as read

    @property
    def is_moe(self) -> bool:
        return self.shape.n_expert > 1

    def quant(self, quant: str) -> CatalogFile:
        for f in self.files:
            if f.quant.upper() == quant.upper():
                return f
        have = ", ".join(f.quant for f in self.files)
        raise NotFound(f"{self.repo} has no {quant} file in the catalog (it has: {have})", repo=self.repo)

    def model_info(self, file: CatalogFile) -> gguf.ModelInfo | None:
        """The ModelInfo read from this file's header, when a refresh has read it."""
        data = self.headers.get(file.file)
        return gguf.ModelInfo(**data["info"]) if data else None

    def layout(self, file: CatalogFile) -> fit.ModelLayout | None:
        """The exact planner input (tensor table by layer) read from this file's header."""
        data = self.headers.get(file.file)
        return layout_from_dict(data) if data else None


@dataclass
class Catalog:
    models: list[CatalogModel]
    origin: str  # "bundled" or "hub <date>"
    refreshed_at: float | None = None

    def get(self, repo: str) -> CatalogModel:
        for m in self.models:
            if m.repo.lower() == repo.lower():
                return m
        raise NotFound(f"{repo} is not in the catalog; `st-bridge catalog` lists what is", repo=repo)

    def find(self, repo: str) -> CatalogModel | None:
        try:
            return self.get(repo)
        except NotFound:
            return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "origin": self.origin,
            "refreshed_at": self.refreshed_at,
            "models": [_model_to_dict(m) for m in self.models],
        }


# --- loading -----------------------------------------------------------------------------------------


def load(data_dir: Path | None = None, ttl_s: float | None = None) -> Catalog:
    """The refreshed catalog cached in `data_dir` when it is younger than `ttl_s`, else the bundled one.

    A stale cache still beats the bundle (its figures are exact); `ttl_s` only decides whether a refresh
    is due (`is_stale`), so `ttl_s=None` accepts a cache of any age.
    """
    if data_dir is not None:
        cached = _read_cache(data_dir / CACHE_NAME)
        if cached is not None:
            return cached
    return bundled()


def bundled() -> Catalog:
    text = resources.files("bridge").joinpath("data/catalog.json").read_text(encoding="utf-8")
    return from_dict(json.loads(text), origin="bundled")


def is_stale(data_dir: Path, ttl_s: float = DEFAULT_TTL_S, now: float | None = None) -> bool:
    cached = _read_cache(data_dir / CACHE_NAME)
    if cached is None or cached.refreshed_at is None:
        return True
    return (now or time.time()) - cached.refreshed_at > ttl_s


def _read_cache(path: Path) -> Catalog | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no cache yet, or a damaged one: the bundle serves
    if data.get("schema") != SCHEMA:
        return None
    return from_dict(data, origin=data.get("origin", "hub"))


def save_cache(catalog: Catalog, data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / CACHE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(catalog.to_dict(), indent=1), encoding="utf-8")
    file_ops.replace(tmp, path)  # atomic: a reader never sees half a file; retried while one reads (Windows)
    return path


def from_dict(data: dict[str, Any], origin: str) -> Catalog:
    models = []
    for m in data["models"]:
        files = [
            CatalogFile(
                quant=f["quant"],
                parts=[Part(**p) for p in f["parts"]],
                source=f["source"],
                source_url=f.get("source_url"),
                estimated=f.get("estimated", False),
                note=f.get("note"),
            )
            for f in m["files"]
        ]
        models.append(
            CatalogModel(
                repo=m["repo"],
                name=m["name"],
                params_b=m["params_b"],
                params_estimated=m["params_estimated"],
                active_params_b=m["active_params_b"],
                license=m.get("license"),
                prompt_format=m.get("prompt_format"),
                context_length=m.get("context_length"),
                base_model=m.get("base_model"),
                shape=Shape(**m["shape"]),
                files=files,
                quant_sensitivity=m.get("quant_sensitivity", 1.0),
                sources=m.get("sources", {}),
                notes=m.get("notes"),
                headers=m.get("headers", {}),
                source=m.get("source", "survey"),
                kind=m.get("kind", "chat"),
                quality=m.get("quality", {}),
                projectors=[Projector(**p) for p in m.get("projectors", [])],
                projector_hint=m.get("projector_hint"),
                embedding=m.get("embedding"),
            )
        )
    return Catalog(models=models, origin=origin, refreshed_at=data.get("refreshed_at"))


def _model_to_dict(m: CatalogModel) -> dict[str, Any]:
    d = asdict(m)
    for f, fd in zip(m.files, d["files"], strict=True):
        fd["file"] = f.file
        fd["size_bytes"] = f.size_bytes
    return d


# --- estimates from the shape --------------------------------------------------------------------------


def params_from_shape(shape: Shape) -> tuple[int, int] | None:
    """(total, active) parameters of a llama-like decoder from its config figures."""
    hd = shape.kv_head_dim
    if not (shape.complete and hd):
        return None
    e, ff, v = shape.n_embd, shape.n_ff, shape.n_vocab
    attn = e * shape.n_head * hd * 2 + e * shape.n_head_kv * hd * 2  # type: ignore[operator]
    experts = max(shape.n_expert, 1)
    ffn_one = 3 * e * ff  # type: ignore[operator]
    per_layer = attn + experts * ffn_one + 2 * e + (e * experts if experts > 1 else 0)  # type: ignore[operator]
    embed = v * e * (1 if shape.tied_embeddings else 2)  # type: ignore[operator]
    total = shape.n_layer * per_layer + embed + e  # type: ignore[operator]
    used = shape.n_expert_used or experts
    active = total - shape.n_layer * (experts - used) * ffn_one  # type: ignore[operator]
    return total, active


# --- building the bundled catalog from the survey ------------------------------------------------------

# Repositories whose own config was not read: the shape is taken from the base model's entry (named on the
# card or in the repo name), and marked estimated.
SHAPE_FROM_BASE = {
    "TheDrummer/Rocinante-12B-v1-GGUF": "bartowski/Mistral-Nemo-Instruct-2407-GGUF",
    "anthracite-org/magnum-v4-12b-gguf": "bartowski/Mistral-Nemo-Instruct-2407-GGUF",
    "QuantFactory/L3-8B-Stheno-v3.2-GGUF": "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
    "l3utterfly/Lumimaid-v0.2-8B-gguf": "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
    # seed 2 (catalog-seed-2.md, "Inferred bases"): per-quant sizes equal to their bases'
    "bartowski/TheDrummer_Cydonia-24B-v2-GGUF": "bartowski/Mistral-Small-24B-Instruct-2501-GGUF",
    "mradermacher/MN-12B-Mag-Mell-R1-GGUF": "bartowski/Mistral-Nemo-Instruct-2407-GGUF",
    "mradermacher/Rocinante-12B-v1.1-GGUF": "bartowski/Mistral-Nemo-Instruct-2407-GGUF",
    # the same language model as 2501 with a vision encoder added; its config was not read
    "unsloth/Mistral-Small-3.1-24B-Instruct-2503-GGUF": "bartowski/Mistral-Small-24B-Instruct-2501-GGUF",
    # Llama 3.3 keeps Llama 3.1 70B's architecture; its config was not read
    "bartowski/Llama-3.3-70B-Instruct-GGUF": "bartowski/Meta-Llama-3.1-70B-Instruct-GGUF",
}
# Trained before 2024 on far fewer tokens: quant loss ~0.3-0.5x Llama-3's (fit-reference.md 3.2, PR #6936).
OLDER_TRAINING = {
    "brittlewis12/Kunoichi-DPO-v2-7B-GGUF": 0.4,
    "TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF": 0.4,
}


def size_tolerance(size_gb: float) -> int:
    """± bytes of a size the Hub printed in decimal GB rounded to three significant figures."""
    digits = math.floor(math.log10(abs(size_gb))) if size_gb else 0
    return int(0.5 * 10 ** (digits - 2) * 1e9)


def build_from_seed(*seeds: dict[str, Any], quality: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundled catalog (JSON-ready) from the survey files (catalog-seed.json, catalog-seed-2.json) and
    the quality figures (scripts/catalog/quality.json)."""
    repos = [r for seed in seeds for r in seed["repos"]]
    shapes = {r["repo"]: _seed_shape(r["arch"]) for r in repos}
    figures = _sourced_figures(quality or {})
    models = [_seed_model(r, shapes, figures.get(r["repo"], {})) for r in repos]
    surveys = dict.fromkeys(s["generated_from"] for s in seeds if s.get("generated_from"))
    return {
        "schema": SCHEMA,
        "origin": "bundled",
        "refreshed_at": None,
        "generated_from": "; ".join(surveys),
        "units": "bytes; survey sizes were decimal GB",
        "quality_sources": (quality or {}).get("sources", {}),
        "models": [_model_to_dict(m) for m in models],
    }


def _seed_shape(arch: dict[str, Any] | None) -> Shape:
    if not arch:
        return Shape()
    a = arch.get("architecture")
    return Shape(
        architecture=a if a and " " not in a else None,
        n_layer=arch.get("n_layer"),
        n_embd=arch.get("n_embd"),
        n_ff=arch.get("n_ff"),
        n_head=arch.get("n_head"),
        n_head_kv=arch.get("n_head_kv"),
        head_dim=arch.get("head_dim"),
        n_vocab=arch.get("n_vocab"),
        n_expert=arch.get("n_expert") or 0,
        n_expert_used=arch.get("n_expert_used") or 0,
        sliding_window=None if arch.get("use_sliding_window") is False else arch.get("sliding_window"),
        n_ctx_train=arch.get("n_ctx_train"),
        tied_embeddings=bool(arch.get("tie_word_embeddings")),
        source_url=arch.get("source_url"),
    )


def _sourced_figures(quality: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each model's figures with their leaderboard's address and date in every figure, so a figure keeps
    its source wherever it is copied (a refreshed cache, the recommendation's JSON)."""
    sources = quality.get("sources", {})
    out: dict[str, dict[str, Any]] = {}
    for repo, figures in quality.get("models", {}).items():
        out[repo] = {
            board: {**figure, "source_url": sources[board]["url"], "as_of": sources[board]["as_of"]}
            for board, figure in figures.items()
        }
    return out


def _seed_model(r: dict[str, Any], shapes: dict[str, Shape], quality: dict[str, Any]) -> CatalogModel:
    shape = shapes[r["repo"]]
    kind = r.get("kind", "chat")
    if not shape.complete and r["repo"] in SHAPE_FROM_BASE:
        base = SHAPE_FROM_BASE[r["repo"]]
        shape = Shape(
            **{**asdict(shapes[base]), "estimated": True, "note": f"shape of {base} (same base model)"}
        )
    counted = params_from_shape(shape)
    params_b, params_estimated = _seed_params(r, counted, kind)
    active_b = params_b
    if r.get("params_active_b"):
        active_b = float(r["params_active_b"])
    elif counted is not None and shape.n_expert:
        active_b = round(params_b * counted[1] / counted[0], 2)
    weights = [row for row in r["files"] if row.get("role") != "mmproj" and not _for_another_runtime(row)]
    return CatalogModel(
        repo=r["repo"],
        name=r["repo"].split("/")[1].removesuffix("-GGUF").removesuffix("-gguf"),
        params_b=params_b,
        params_estimated=params_estimated,
        active_params_b=active_b,
        license=r.get("license"),
        prompt_format=r.get("prompt_format"),
        context_length=r.get("context_length") or shape.n_ctx_train,
        base_model=r.get("base_model"),
        shape=shape,
        files=_seed_files(weights),
        quant_sensitivity=OLDER_TRAINING.get(r["repo"], 1.0),
        sources={
            "card": r.get("source_url"),
            "files": r.get("files_source_url"),
            "shape": shape.source_url,
            "params": _params_source(r, counted, params_estimated),
        },
        notes=r.get("notes"),
        kind=kind,
        quality=quality,
        projectors=[_seed_projector(row) for row in r["files"] if row.get("role") == "mmproj"],
        projector_hint=r.get("mmproj_hint"),
        embedding=r.get("embedding"),
    )


def _seed_params(r: dict[str, Any], counted: tuple[int, int] | None, kind: str) -> tuple[float, bool]:
    """(billions of parameters, estimated): the page's figure, else counted from the shape. A vision or
    embedding model may have neither (0.0, estimated): it is never ranked by size."""
    if r.get("params_b") is not None:
        return float(r["params_b"]), False
    if counted is not None:
        return round(counted[0] / 1e9, 2), True
    if kind != "chat":
        return 0.0, True
    raise BridgeError(f"{r['repo']}: neither a parameter count nor a shape to count them from")


def _params_source(r: dict[str, Any], counted: tuple[int, int] | None, estimated: bool) -> str:
    if not estimated:
        return "model name" if r.get("kind", "chat") == "chat" else "repository page"
    return "counted from the shape (estimated)" if counted is not None else "not read"


def _for_another_runtime(row: dict[str, Any]) -> bool:
    """Files made for bert.cpp, not llama.cpp (catalog-seed-2.md: vonjack's `*_bert_cpp.gguf`)."""
    return "bert_cpp" in row.get("file", "") or "bert.cpp" in (row.get("note") or "")


def _seed_projector(row: dict[str, Any]) -> Projector:
    note = row.get("note") or ""
    return Projector(
        path=row.get("path") or row["file"],
        size_bytes=round(row["size_gb"] * 1e9),
        size_tolerance_bytes=size_tolerance(row["size_gb"]),
        source=row["size_source"],
        source_url=row.get("size_source_url"),
        quant=row.get("quant"),
        for_model=note.removeprefix("projector for ") if note.startswith("projector for ") else None,
        note=row.get("note"),
    )


def _seed_files(rows: list[dict[str, Any]]) -> list[CatalogFile]:
    """One CatalogFile per quant file; the parts of a split file (`-0000k-of-0000n`) grouped as one unit."""
    groups: dict[str, CatalogFile] = {}
    for row in rows:
        path = row.get("path") or row["file"]
        hints = parse_name(path)
        key = gguf.SHARD_RE.sub(r"\g<stem>", Path(path).name) if hints.split_part else path
        part = Part(
            path=path,
            size_bytes=round(row["size_gb"] * 1e9),
            size_tolerance_bytes=size_tolerance(row["size_gb"]),
        )
        if key in groups:
            groups[key].parts.append(part)
            continue
        groups[key] = CatalogFile(
            quant=row["quant"],
            parts=[part],
            source=row["size_source"],
            source_url=row.get("size_source_url"),
            note=row.get("note"),
        )
    return sorted(groups.values(), key=lambda f: f.size_bytes)


# --- refresh from the Hub ------------------------------------------------------------------------------


def refresh(
    catalog: Catalog,
    hub: Any,
    *,
    read_headers: bool = True,
    repos: list[str] | None = None,
    authors: list[str] | None = None,
    per_author: int = DISCOVER_PER_AUTHOR,
    log: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> Catalog:
    """Exact sizes, sha256 and GGUF headers from the Hub for every (or the named) catalog repository.

    `hub` is a `bridge.hub.HubClient`. Repositories the Hub cannot answer for keep their survey figures
    (and the failure goes to `log`); a refresh never drops a catalog model it could not reach. `authors`
    lists trusted uploaders: their `per_author` most downloaded GGUF repositories not in the catalog yet are
    added, marked `"source": "discovered"`. A header already read for a file whose sha256 has not changed is
    kept, not read again. Once `stop` is set the remaining repositories are left as they are.
    """
    say = log or (lambda _message: None)
    models = list(catalog.models) + _discover(catalog, hub, authors or [], per_author, say)
    wanted = {r.lower() for r in repos} if repos else None
    out = []
    for model in models:
        if (wanted is not None and model.repo.lower() not in wanted) or (stop and stop.is_set()):
            out.append(model)
            continue
        try:
            out.append(_refresh_model(model, hub, read_headers))
        except BridgeError as exc:
            say(f"{model.repo}: kept the figures it had ({exc.message})")
            out.append(model)
    # A discovered repository whose files could not be read has nothing to offer yet (a projector-only
    # repository offers its projectors).
    return Catalog(models=[m for m in out if m.files or m.projectors], origin="hub", refreshed_at=time.time())


def refresh_cache(
    data_dir: Path,
    hub: Any,
    *,
    authors: list[str] | None = None,
    read_headers: bool = True,
    repos: list[str] | None = None,
    log: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> tuple[Catalog, bool]:
    """Refresh the catalog cached in `data_dir` (the bundled one the first time) and save it.

    Returns the catalog and whether any figure changed. A refresh that `stop` interrupted saves nothing:
    half the repositories refreshed would pass for a whole refresh until the time-to-live ran out.
    """
    before = load(data_dir)
    after = refresh(before, hub, read_headers=read_headers, repos=repos, authors=authors, log=log, stop=stop)
    if stop is not None and stop.is_set():
        return before, False
    save_cache(after, data_dir)
    return after, not same_models(before, after)


def same_models(a: Catalog, b: Catalog) -> bool:
    """Whether two catalogs list the same models with the same figures (their dates aside)."""
    return a.to_dict()["models"] == b.to_dict()["models"]


def _discover(
    catalog: Catalog, hub: Any, authors: list[str], per_author: int, say: Callable[[str], None]
) -> list[CatalogModel]:
    known = {m.repo.lower() for m in catalog.models}
    found = []
    for author in authors:
        try:
            listed = hub.list_gguf_repos(author, per_author)
        except BridgeError as exc:
            say(f"could not list the repositories of {author} ({exc.message})")
            continue
        for repo in listed:
            if repo.lower() not in known:
                known.add(repo.lower())
                found.append(_empty_model(repo, f"{hub.endpoint}/{repo}"))
    return found


def _empty_model(repo: str, url: str) -> CatalogModel:
    hints = parse_name(repo)
    return CatalogModel(
        repo=repo,
        name=repo.split("/")[1].removesuffix("-GGUF").removesuffix("-gguf"),
        params_b=(hints.n_params or 0) / 1e9,
        params_estimated=True,
        active_params_b=(hints.n_params or 0) / 1e9,
        license=None,
        prompt_format=None,
        context_length=None,
        base_model=None,
        shape=Shape(),
        files=[],
        source="discovered",
        sources={"card": url, "params": "repository name (until a header is read)"},
    )


def _refresh_model(model: CatalogModel, hub: Any, read_headers: bool) -> CatalogModel:
    remote = hub.gguf_files(model.repo)
    files = []
    for quant, parts in _group_remote(remote).items():
        known = next((f for f in model.files if f.quant.upper() == quant.upper()), None)
        files.append(
            CatalogFile(
                quant=known.quant if known else quant,
                parts=[Part(path=p.path, size_bytes=p.size, sha256=p.sha256) for p in parts],
                source="hub_api",
                source_url=f"{hub.endpoint}/api/models/{model.repo}/revision/{hub.commit(model.repo)}",
            )
        )
    files.sort(key=lambda f: f.size_bytes)
    headers = _unchanged_headers(model, files)
    shape = model.shape
    for f in _headers_to_read(files, headers, shape, read_headers):
        layout = fit.ModelLayout.from_header(hub.read_header(model.repo, [p.path for p in f.parts]))
        headers[f.file] = layout_to_dict(layout)
        shape = _shape_from_info(layout.info) if not shape.complete or shape.estimated else shape
    params_b, active_b, estimated = model.params_b, model.active_params_b, model.params_estimated
    if headers and (estimated or not params_b):
        info = gguf.ModelInfo(**next(iter(headers.values()))["info"])
        params_b, active_b, estimated = (
            round(info.n_params / 1e9, 2),
            round(info.n_params_active / 1e9, 2),
            False,
        )
    return CatalogModel(
        **{
            **asdict(model),
            "files": files,
            "headers": headers,
            "shape": shape,
            "params_b": params_b,
            "active_params_b": active_b,
            "params_estimated": estimated,
        }
    )


def _unchanged_headers(model: CatalogModel, files: list[CatalogFile]) -> dict[str, dict[str, Any]]:
    """The headers read before for files whose every part still has the same sha256."""
    old = {p.path: p.sha256 for f in model.files for p in f.parts}
    return {
        f.file: model.headers[f.file]
        for f in files
        if f.file in model.headers and all(p.sha256 and old.get(p.path) == p.sha256 for p in f.parts)
    }


def _headers_to_read(
    files: list[CatalogFile], have: dict[str, Any], shape: Shape, read_all: bool
) -> list[CatalogFile]:
    """Every file's header when asked for all; else only the smallest file's, for a model with no shape
    yet (a discovered one): the shape and parameter count are the model's, and with them and each file's
    exact size the recommender lays out the other quants itself. A header costs megabytes (the tokenizer),
    so a model's twenty quants are not read just in case."""
    missing = [f for f in files if f.file not in have]
    if read_all:
        return missing
    if shape.complete or have or not files:
        return []
    return missing[:1]


def _group_remote(remote: list[Any]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for f in remote:
        name = Path(f.path).name
        hints = parse_name(name)
        if not hints.quant or "mmproj" in name.lower() or "bert_cpp" in name:
            continue  # projectors stay in `projectors`; bert.cpp files are not for llama.cpp
        # Two files of the same quant that are not shards of one set (rare: re-uploads) keep the first.
        group = groups.setdefault(hints.quant, [])
        if group and not hints.split_part:
            continue
        group.append(f)
    for parts in groups.values():
        parts.sort(key=lambda f: f.path)
    return groups


def _shape_from_info(info: gguf.ModelInfo) -> Shape:
    return Shape(
        architecture=info.architecture,
        n_layer=info.n_layer,
        n_embd=info.n_embd,
        n_ff=max(info.n_ff or [0]),
        n_head=max(info.n_head or [0]),
        n_head_kv=max(info.n_head_kv or [0]),
        head_dim=info.head_dim_k,
        n_vocab=info.n_vocab,
        n_expert=info.n_expert,
        n_expert_used=info.n_expert_used,
        sliding_window=info.sliding_window or None,
        n_ctx_train=info.n_ctx_train,
        tied_embeddings=info.tied_output,
        source_url="GGUF header (range read)",
    )


# --- the planner's input, stored -----------------------------------------------------------------------


def layout_to_dict(layout: fit.ModelLayout) -> dict[str, Any]:
    """A JSON-ready copy of the planner's per-layer byte table (what a header read is kept for)."""

    def mats(ms: list[fit.Matrix]) -> list[list[Any]]:
        return [[m.nbytes, m.rows, m.expert, m.repackable] for m in ms]

    return {
        "info": asdict(layout.info),
        "blocks": [mats(b) for b in layout.blocks],
        "output": mats(layout.output),
        "token_embd": layout.token_embd,
        "input_other": layout.input_other,
        "total_bytes": layout.total_bytes,
    }


def layout_from_dict(d: dict[str, Any]) -> fit.ModelLayout:
    def mats(rows: list[list[Any]]) -> list[fit.Matrix]:
        return [fit.Matrix(int(n), int(r), bool(e), bool(p)) for n, r, e, p in rows]

    return fit.ModelLayout(
        gguf.ModelInfo(**d["info"]),
        [mats(b) for b in d["blocks"]],
        mats(d["output"]),
        d["token_embd"],
        d["input_other"],
        d["total_bytes"],
    )
