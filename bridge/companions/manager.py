"""The companions beside the chat model: the embedding model (its own worker) and the chat model's vision
projector (in the chat worker), chosen, planned, loaded, dropped and reported in one place.

The memory rule: every plan is made on the memory free now, where running companions already hold
theirs. An embedding model is planned on what is free beside the chat model (plus its predecessor's
share when it replaces one); a chat model is planned after its projector has taken its share, and refused
with the companions named when it does not fit beside them. Nothing loads before its plan fits.

The choices survive a restart (`companions.json` in the data dir): the embedding model used last loads
again at start, and a projector dropped for a model stays dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import library
from ..config import Settings
from ..errors import BadRequest, BridgeError, NotEnoughMemory, NotLoaded
from ..events import EventBus
from ..gguf import read_file
from ..hardware import HardwareReport
from ..planning import LoadedUse, LoadPlan, after_unload, process_anonymous_mib
from . import pairing, plans
from .embedder import Embedder
from .embedding_worker import EmbeddingSpec
from .families import Family, Role, family_of, is_embedding_model

log = logging.getLogger(__name__)

STATE_NAME = "companions.json"
MAX_TEXTS = 2048  # texts in one embedding request


@dataclass
class Vectors:
    vectors: list[list[float]]
    n_tokens: int
    truncated: int
    model: str


@dataclass
class VisionChoice:
    """The projector a chat load carries, and how it was chosen."""

    projector: pairing.Projector
    plan: plans.CompanionPlan
    auto: bool  # paired from the models folder (True) or named by the user


class Companions:
    def __init__(self, settings: Settings, bus: EventBus,
                 probe: Callable[[], HardwareReport] | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self._probe = probe
        self.embedder = Embedder(on_event=self._on_embedder_event, hang_timeout_s=settings.stall_timeout_s)
        self.family: Family | None = None
        self.embedding_plan: plans.CompanionPlan | None = None
        self.vision_plan: dict[str, Any] | None = None  # the loaded chat model's projector, as planned
        self.vision_note: str | None = None  # why the loaded chat model has no projector, when it has one
        self._state = self._read_state()

    # --- state -------------------------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.settings.data_dir / STATE_NAME).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_state(self, **changes: Any) -> None:
        self._state |= changes
        path = self.settings.data_dir / STATE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state))
        os.replace(tmp, path)

    def machine(self) -> HardwareReport:
        from ..hardware import probe

        return (self._probe or probe)()

    # --- embedding model ---------------------------------------------------------------------------------

    async def load_embedding(self, model: str, *, n_ctx: int | None = None, trusted: bool = False,
                             ) -> dict[str, Any]:
        """Load `model` (an id in the models folder; a path only when `trusted`) as the embedding model,
        after checking that it fits beside what runs now."""
        path, model_id = self._locate(model, trusted)
        header = await asyncio.to_thread(read_file, path)
        if not is_embedding_model(header):
            raise BadRequest(f"{model_id} is not an embedding model (no pooling, not an encoder): pick one "
                             "such as nomic-embed-text or bge, see GET /bridge/v1/companions/recommend")
        ctx = n_ctx or self.settings.embedding_ctx
        plan = plans.plan_embedding(header, model_id, ctx)
        machine = await asyncio.to_thread(self.machine_for_embedding)
        plans.check_fits(plan, machine, self._beside_chat())
        family = family_of(header, path.name)
        spec = EmbeddingSpec(model_path=str(path), model_id=model_id, n_ctx=ctx,
                             fallback_pooling=family.pooling or "mean")
        previous = self._state.get("embedding_model")
        self.bus.publish("companion_loading", {"role": "embedding", "model": model_id})
        try:
            info = await self.embedder.load(spec)
        except BridgeError:
            self.embedding_plan, self.family = None, None
            self.bus.publish("companions", self.status())
            raise
        self.family, self.embedding_plan = family, plan
        self._save_state(embedding=str(path), embedding_model=model_id)
        if previous and previous != model_id:
            self.bus.publish("embedding_model_changed", {
                "previous": previous, "model": model_id,
                "message": f"the embedding model is now {model_id} (was {previous}): SillyTavern's vector "
                           "index was built with the old one, so purge and vectorize again (Vector Storage → "
                           "Purge vectors, then Vectorize All)"})
        self.bus.publish("companions", self.status())
        return self.status() | {"loaded": {"model": model_id, **info}}

    async def drop_embedding(self) -> dict[str, Any]:
        await self.embedder.unload()
        self.embedding_plan, self.family = None, None
        self._save_state(embedding=None)
        self.bus.publish("companions", self.status())
        return self.status()

    async def embed(self, texts: list[str], role: Role = "unspecified",
                    dimensions: int | None = None) -> Vectors:
        """Vectors of `texts` in order: the family's prefix, llama.cpp's pooling, the family's
        normalisation, and (`dimensions`) a Matryoshka cut to the first dimensions, normalised again."""
        if len(texts) > MAX_TEXTS:
            raise BadRequest(f"{len(texts)} texts in one request; send at most {MAX_TEXTS}")
        family = self.family
        prefix = family.prefix(role) if family else ""
        raw, n_tokens, truncated = await self.embedder.embed([prefix + t for t in texts])
        model = self.embedder.spec.model_id if self.embedder.spec else "unknown"
        out = [finish(v, family.normalize if family else True, dimensions) for v in raw]
        return Vectors(out, n_tokens, truncated, model)

    def machine_for_embedding(self) -> HardwareReport:
        """The memory free now, plus what the running embedding model holds (it is being replaced)."""
        report = self.machine()
        pid = self.embedder.pid
        if pid is None:
            return report
        return after_unload(report, LoadedUse("embedding", ram_mib=process_anonymous_mib(pid)))

    def _beside_chat(self) -> str:
        if self.vision_plan is None:
            return " beside the chat model"
        return (f" beside the chat model and its projector {self.vision_plan['model_id']} "
                f"({self.vision_plan['total_mib']:.0f} MiB)")

    def _locate(self, model: str, trusted: bool) -> tuple[Path, str]:
        if trusted and Path(model).expanduser().is_file():
            path = Path(model).expanduser().resolve()
            root = self.settings.models_path.resolve()
            return path, library.model_id(path, root) if path.is_relative_to(root) else path.stem
        found = library.resolve(self.settings.models_path, model)
        return found.path, found.id

    # --- vision --------------------------------------------------------------------------------------------

    def vision_for(self, model_path: Path, report: HardwareReport) -> VisionChoice | None:
        """The projector a load of `model_path` carries: the one the user named for it, else the one
        paired in its folder (unless the user dropped vision for it)."""
        chosen = self._state.get("vision", {}).get(str(model_path))
        if chosen == "off" or not self.settings.vision:
            return None
        if chosen:
            projector, auto = pairing.resolve(self.settings.models_path, chosen), False
        else:
            projector = pairing.local_projector(model_path, self.settings.models_path)
            auto = True
            if projector is None:
                return None
        plan = plans.plan_projector(read_file(projector.path), projector.model_id, report)
        return VisionChoice(projector, plan, auto)

    def plan_chat(self, model_path: Path | None, report: HardwareReport,
                  plan: Callable[[HardwareReport], LoadPlan]) -> LoadPlan:
        """The chat model's plan with its projector's share taken first. A projector paired automatically
        that does not fit beside the model is left out (and the status says so); one the user named makes
        the load fail, with both sizes in the message."""
        choice = self.vision_for(model_path, report) if model_path is not None else None
        if choice is None:
            return plan(report)
        try:
            planned = plan(plans.reserve(report, [choice.plan]))
        except NotEnoughMemory as exc:
            if not choice.auto:
                raise NotEnoughMemory(f"{exc.message}{plans.beside_note([choice.plan])}") from exc
            planned = plan(report)  # raises on its own when the model alone does not fit either
            planned.summary["vision_note"] = (
                f"the projector {choice.projector.model_id} ({choice.plan.total_mib:.0f} MiB) was left out: "
                "it does not fit beside the model")
            return planned
        planned.mmproj_path = str(choice.projector.path)
        planned.mmproj_gpu = choice.plan.device != plans.HOST
        planned.summary["companions"] = [choice.plan.to_dict()]
        return planned

    def chat_loaded(self, summary: dict[str, Any]) -> None:
        """A chat load planned as `summary` finished: its projector (or why it has none) is current."""
        self.vision_plan = next(iter(summary.get("companions") or []), None)
        self.vision_note = summary.get("vision_note")
        self.bus.publish("companions", self.status())

    def check_images(self, engine_status: Any, images: list[Any]) -> None:
        """A request with images needs a chat model that sees: say which is missing, before it queues."""
        if not images or engine_status.vision:
            return
        name = engine_status.model_id or "no chat model"
        raise NotLoaded(f"the request holds {len(images)} image(s) but {name} has no vision projector "
                        "(mmproj): load a vision model with its projector beside it in the models folder, "
                        "or pick a projector in the st-bridge panel (Companions)")

    def set_vision(self, model_path: Path, projector: str | None) -> None:
        """For `model_path`: a projector id, "auto" (pair from its folder) or "off"."""
        choices = dict(self._state.get("vision", {}))
        if projector in (None, "auto"):
            choices.pop(str(model_path), None)
        else:
            if projector != "off":
                pairing.resolve(self.settings.models_path, projector)  # NotFound names the models folder
            choices[str(model_path)] = projector
        self._save_state(vision=choices)

    # --- status ------------------------------------------------------------------------------------------

    def status(self, engine_vision: dict[str, Any] | None = None,
               chat_model: str | None = None) -> dict[str, Any]:
        """What runs beside the chat model; with `chat_model` (its path), also the user's projector choice
        for it ("auto", "off" or a projector id)."""
        embedder = self.embedder
        embedding = {
            "state": embedder.state,
            "model": embedder.spec.model_id if embedder.spec else None,
            "error": embedder.error,
            "family": self.family.to_dict() if self.family else None,
            "plan": self.embedding_plan.to_dict() if self.embedding_plan else None,
            "actual": embedder.info.get("allocation"),
            "n_ctx": embedder.info.get("n_ctx"),
            "dimensions": embedder.info.get("n_embd"),
            "pooling": embedder.info.get("pooling"),
            "pid": embedder.pid,
        }
        vision = {"projector": (engine_vision or {}).get("projector"), "plan": None, "note": self.vision_note,
                  "enabled": self.settings.vision}
        if chat_model:
            vision["choice"] = self._state.get("vision", {}).get(chat_model, "auto")
        if self.vision_plan is not None:
            vision["plan"] = self.vision_plan
            vision["model"] = self.vision_plan["model_id"]
        return {"embedding": embedding, "vision": vision}

    def _on_embedder_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "error":
            self.bus.publish("error", data | {"role": "embedding"})
        self.bus.publish("companions", self.status())

    # --- lifetime ------------------------------------------------------------------------------------------

    async def load_at_start(self) -> None:
        """Load `--embedding-model`, else the embedding model used last time."""
        model = self.settings.embedding_model or self._state.get("embedding")
        if not model:
            return
        try:
            await self.load_embedding(model, trusted=True)
            log.info("embedding model %s is ready", model)
        except BridgeError as exc:
            log.error("could not load the embedding model %s: %s", model, exc.message)

    async def close(self) -> None:
        await self.embedder.close()


def finish(vector: np.ndarray, normalize: bool, dimensions: int | None) -> list[float]:
    values = vector.astype(np.float64)
    if dimensions is not None:
        if not 0 < dimensions <= len(values):
            raise BadRequest(f"dimensions must be between 1 and {len(values)} for this model")
        values = values[:dimensions]
    if normalize or dimensions is not None:
        norm = float(np.linalg.norm(values))
        values = values / norm if norm > 0 else values
    return values.tolist()
