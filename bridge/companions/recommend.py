"""Embedding models for this machine, from the catalog, and the companions already in the models folder.

An embedding model is small beside a chat model (50 MB to 1.2 GB), and quantization costs it more than it
costs a chat model (its vectors are compared by angle, with no sampling to absorb the error), so each
repository is offered at Q8_0, or its closest file below that where the listing stops short; ternary
files (TQ1_0, TQ2_0) are skipped. A pick fits when its weights and an estimate of its context's compute
fit in the RAM free beside what runs now (the chat model and its projector hold theirs already).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import catalog, library
from ..config import Settings
from ..errors import BridgeError
from ..gguf import read_file
from . import pairing, plans
from .families import family_of, is_embedding_model

MIB = 1 << 20
ORDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "F16", "BF16", "F32")
SKIP = {"TQ1_0", "TQ2_0", "Q2_K", "Q3_K_S"}


def pick_file(model: catalog.CatalogModel) -> catalog.CatalogFile | None:
    files = {f.quant.upper(): f for f in model.files if f.quant.upper() not in SKIP}
    for quant in ORDER:
        if quant in files:
            return files[quant]
    return max(files.values(), key=lambda f: f.size_bytes, default=None)


def estimated_mib(size_bytes: int, n_ctx: int) -> float:
    """Weights plus a compute buffer for an `n_ctx`-token ubatch (the f16 attention mask and activations,
    which grow with the model's width: estimated from its size where its shape was not read)."""
    weights = size_bytes / MIB
    return weights + 2 * n_ctx * n_ctx / MIB + max(32.0, 0.35 * weights)


def recommend_embeddings(settings: Settings, companions: Any, limit: int = 8) -> dict[str, Any]:
    machine = companions.machine_for_embedding()
    free = plans.ram_usable_mib(machine)
    picks = []
    for model in catalog.load(settings.data_dir).models:
        if model.kind != "embedding":
            continue
        chosen = pick_file(model)
        if chosen is None:
            continue
        need = estimated_mib(chosen.size_bytes, settings.embedding_ctx)
        family = family_of_name(model.repo)
        picks.append({
            "repo": model.repo, "name": model.name, "quant": chosen.quant, "file": chosen.file,
            "size_bytes": chosen.size_bytes, "size_exact": chosen.exact, "source": chosen.source,
            "source_url": chosen.source_url, "card": model.sources.get("card"), "family": family,
            "needs_mib": round(need), "fits": need <= free,
            "reason": f"needs about {need:.0f} MiB of the {max(free, 0):.0f} MiB of RAM free beside what "
                      "runs",
            "pull": f"st-bridge pull {model.repo} --quant {chosen.quant}",
            "embedding": model.embedding,
        })
    picks.sort(key=lambda p: (not p["fits"], p["size_bytes"]))
    return {"free_mib": round(max(free, 0)), "n_ctx": settings.embedding_ctx, "candidates": picks[:limit]}


def family_of_name(repo: str) -> str:
    from ..gguf import GGUFHeader

    return family_of(GGUFHeader(name=repo, version=3, metadata={}, tensors=[]), repo).name


def local_companions(settings: Settings, companions: Any) -> dict[str, Any]:
    """The embedding models and projectors in the models folder, each with its memory and fit."""
    machine = companions.machine_for_embedding()
    free = plans.ram_usable_mib(machine)
    embeddings, projectors = [], []
    for model in library.scan(settings.models_path):
        entry = _embedding_entry(model, settings.embedding_ctx, free)
        if entry is not None:
            embeddings.append(entry)
    for projector in library.projectors(settings.models_path):
        projectors.append(_projector_entry(projector, settings.models_path))
    return {"local": {"embedding": embeddings, "projectors": projectors, "ram_free_mib": round(max(free, 0))}}


def _embedding_entry(model: library.LocalModel, n_ctx: int, free: float) -> dict[str, Any] | None:
    try:
        header = read_file(model.path)
    except (BridgeError, OSError):
        return None
    if not is_embedding_model(header):
        return None
    plan = plans.plan_embedding(header, model.id, n_ctx)
    return {"id": model.id, "size_bytes": model.size_bytes, "family": family_of(header, model.path.name).name,
            "plan": plan.to_dict(), "fits": plan.total_mib <= free}


def _projector_entry(projector: library.LocalModel, models_dir: Path) -> dict[str, Any]:
    folder = projector.path.parent
    paired = [m.id for m in library.scan(models_dir) if m.path.parent == folder
              and (found := pairing.local_projector(m.path, models_dir)) is not None
              and found.path == projector.path]
    try:
        plan = plans.plan_projector(read_file(projector.path), projector.id).to_dict()
    except (BridgeError, OSError) as exc:
        plan = {"error": str(exc)}
    return {"id": projector.id, "size_bytes": projector.size_bytes, "paired_with": paired, "plan": plan}
