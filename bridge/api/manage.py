"""The management API (`/bridge/v1/*`) and the `ModelManager` behind it: which model is loaded, with
which plan, loading and unloading it, and the events the ST extension watches."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import Field

from .. import library
from ..companions.manager import Companions
from ..config import Settings, last_model, remember_model
from ..devices.actual import Allocation, compare
from ..devices.overhead import learned_overheads
from ..engine.types import LoadSpec
from ..errors import BadRequest, BridgeError, EngineError, NotFound
from ..events import Event, EventBus
from ..gguf import GGUFHeader, ModelInfo, model_info, read_file
from ..hardware import HardwareReport
from ..planning import LoadedUse, LoadPlan, after_unload, budget_note, loaded_use, plan_load
from ..speed_watch import SpeedWatch
from ..workers.registry import lost, registry
from . import BUS_KEY, MANAGER_KEY, SETTINGS_KEY, EngineLike
from .schemas import LoadBody
from .streaming import sse_open, sse_send
from .translate import parse

log = logging.getLogger(__name__)

routes = web.RouteTableDef()
PING_S = 15.0  # SSE keep-alive, well under the idle timeouts of browsers and proxies
FALLBACK_CTX = 4096  # context when no planner is available and the model was trained for more
STREAMS_KEY = web.AppKey("event_streams", weakref.WeakSet)


class ModelManager:
    """Loads, swaps and unloads models on the engine, one at a time, and remembers the last one used.

    A swap (`load` while a model serves) is live: the engine holds new requests from the moment it starts,
    lets the running generation finish (or cancels it), and serves the held requests with the new model.
    From that moment `model_name()` names the incoming model, since it is the one new requests will get.
    """

    def __init__(self, settings: Settings, engine: EngineLike, bus: EventBus) -> None:
        self.settings = settings
        self.engine = engine
        self.bus = bus
        self.info: ModelInfo | None = None
        self.plan: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._incoming: str | None = None  # the id of the model a load under way brings in
        self._overrides: dict[str, Any] = {}  # the settings the loaded model was asked for
        self.loaded: LoadedUse | None = None  # what the loaded model's worker holds, measured after its load
        self._respecced: dict[str, Any] | None = None  # the plan a restart after a lost worker loads
        self.speed = SpeedWatch()  # the loaded model's predicted and measured speed (status)
        self.companions = Companions(settings, bus)  # the embedding model and the vision projector

    # --- what is loaded ---

    def model_name(self) -> str:
        if self._incoming is not None:
            return self._incoming
        status = self.engine.status()
        return status.model_id or "" if status.state in ("ready", "loading") else ""

    def hint(self) -> str | None:
        """How to get a model, when none is loaded."""
        if self.engine.status().state in ("ready", "loading"):
            return None
        ids = [m.id for m in library.scan(self.settings.models_path)]
        where = f"put a GGUF file in {self.settings.models_path}"
        if ids:
            return (
                f'no model is loaded: POST /bridge/v1/load {{"model": "{ids[0]}"}} or restart with '
                f"`st-bridge serve --model {ids[0]}` (models here: {', '.join(ids[:5])})"
            )
        return (
            "no model is loaded: `st-bridge recommend` shows what fits this machine and "
            "`st-bridge pull REPO --load` fetches and loads it (or press Recommend model in SillyTavern's "
            f"st-bridge panel); or {where}, then `st-bridge serve --model <file name>`"
        )

    def status_dict(self) -> dict[str, Any]:
        status = self.engine.status()
        data = dataclasses.asdict(status)
        data.pop("chat_template", None)
        return data | {
            "model": self.model_name() or None,
            "plan": self.plan,
            "hint": self.hint(),
            "models_dir": str(self.settings.models_path),
            "speed": self.speed.to_dict() if self.plan else None,
            "companions": self.companions.status(status.vision, status.model_path),
        }

    # --- loading ---

    async def swap(
        self, model: str | None = None, *, quant: str | None = None, cancel_running: bool = False,
        **overrides: Any,
    ) -> dict[str, Any]:
        """`POST /load`: another model by id; with `quant` only, the loaded model's sibling file of that
        quant; with neither, the loaded file again with new settings (e.g. a context change)."""
        if model is not None:
            return await self.load(model, cancel_running=cancel_running, **overrides)
        loaded = self._loaded_path()
        # Same model, other quant or context: keep what the user chose before unless this request changes it.
        kept = self._overrides | {key: value for key, value in overrides.items() if value is not None}
        path = loaded if quant is None else self._sibling(loaded, quant)
        return await self.load(str(path), trusted=True, cancel_running=cancel_running, **kept)

    def _loaded_path(self) -> Path:
        status = self.engine.status()
        if status.model_path is None or status.state not in ("ready", "loading"):
            raise BadRequest(
                'no model is loaded, so there is no quant or context to switch: name one, as in '
                '{"model": "<id from GET /bridge/v1/models>"}'
            )
        return Path(status.model_path)

    @staticmethod
    def _sibling(loaded: Path, quant: str) -> Path:
        found = library.siblings(loaded)
        wanted = quant.strip().upper()
        if wanted in found:
            return found[wanted]
        have = ", ".join(sorted(found)) or "none"
        raise NotFound(
            f"no {quant} file of this model next to {loaded.name} (quants here: {have}); "
            "download it first, see GET /bridge/v1/models/{id}/quants",
            quant=quant,
        )

    async def load(
        self, model: str, *, trusted: bool = False, cancel_running: bool = False, **overrides: Any
    ) -> dict[str, Any]:
        """Load `model` (an id in the models dir; a file path only when `trusted`: from the CLI, or a file
        found next to the loaded one). Anything wrong with the file or the fit fails here, before the engine
        is touched, so the loaded model keeps serving."""
        path, model_id = self._locate(model, trusted)
        try:
            header = await asyncio.to_thread(read_file, path)
            planned = await asyncio.to_thread(self._plan, header, overrides, path)
        except BridgeError as exc:
            self.bus.publish("error", {"model": model_id, "model_id": model_id, "message": exc.message})
            raise
        spec = LoadSpec(
            model_path=str(path),
            model_id=model_id,
            n_ctx=planned.n_ctx,
            n_gpu_layers=planned.placement.n_gpu_layers,
            kv_type=planned.kv_type,
            flash_attn=planned.flash_attn,
            chat_memory_mib=self.settings.chat_memory_mib,
            chat_memory_disk_mib=self.settings.chat_memory_disk_mib,
            chat_memory_dir=str(self.settings.data_dir / "chat-memory"),
            placement=planned.placement,
            mmproj_path=planned.mmproj_path,
            mmproj_gpu=planned.mmproj_gpu,
        )
        plan = planned.summary
        requested = {key: value for key, value in overrides.items() if value is not None}
        # A client that gives up waiting must not cancel a load half-way: it runs as its own task.
        task = asyncio.ensure_future(self._load(spec, plan, model_info(header), requested, cancel_running))
        return await asyncio.shield(task)

    def model_file(self, model: str) -> Path:
        """The file of a local model id; the loaded model's own file when it is that id (a model loaded from
        a path outside the models folder has no id there)."""
        status = self.engine.status()
        if status.model_id == model and status.model_path:
            return Path(status.model_path)
        return library.resolve(self.settings.models_path, model).path

    def _locate(self, model: str, trusted: bool) -> tuple[Path, str]:
        if trusted and Path(model).expanduser().is_file():
            path = Path(model).expanduser().resolve()
            root = self.settings.models_path.resolve()
            inside = path.is_relative_to(root)
            return path, library.model_id(path, root) if inside else path.stem
        found = library.resolve(self.settings.models_path, model)
        return found.path, found.id

    async def _load(
        self, spec: LoadSpec, plan: dict[str, Any], info: ModelInfo, requested: dict[str, Any],
        cancel_running: bool,
    ) -> dict[str, Any]:
        async with self._lock:
            named = {"model": spec.model_id, "model_id": spec.model_id}  # the extension reads `model`
            self.bus.publish("load_started", named | {"plan": plan})
            self._incoming = spec.model_id
            try:
                # The engine announces progress and failures itself (see on_engine_event).
                status = await self._engine_load(spec, cancel_running)
            except BridgeError:
                self._incoming = None
                self._announce_ready()  # the previous model, when it is serving again
                self.bus.publish("status", self.status_dict())
                raise
            # Before the new plan shows in the status: a client that sees the model loaded sees its speeds.
            speed = await asyncio.to_thread(self._watch_speed, spec, plan)
            self._incoming = None
            self.info, self._overrides, self.speed = info, requested, speed
            self.companions.chat_loaded(plan)
            remember_model(self.settings, spec.model_path)
            self.plan = plan | {
                "n_ctx": status.n_ctx,
                "n_gpu_layers": status.n_gpu_layers,
                "kv_type": status.kv_type,
                "flash_attn": status.flash_attn,
            } | self._check_allocation(spec.model_id, plan, status)
            self._announce_ready()
            self.bus.publish("model_loaded", named | {"plan": self.plan})
            self.bus.publish("status", self.status_dict())
            return {"model": spec.model_id, "plan": self.plan, "status": self.status_dict()}

    def _watch_speed(self, spec: LoadSpec, plan: dict[str, Any]) -> SpeedWatch:
        return SpeedWatch.after_load(spec.model_path, spec.model_id, plan, self.planning_machine(),
                                     self.settings.data_dir)

    def _plan(self, header: GGUFHeader, overrides: dict[str, Any], path: Path | None = None) -> LoadPlan:
        """The request's settings, then the config's, then the planner's for the rest, on the memory the
        machine will have once the loaded model is gone."""
        chosen = {
            "n_ctx": overrides.get("ctx") or self.settings.ctx,
            "n_gpu_layers": _gpu_layers(overrides.get("gpu_layers"), self.settings.gpu_layers),
            "kv_type": overrides.get("kv_type") or self.settings.kv_type,
            "flash_attn": _first(overrides.get("flash_attn"), self.settings.flash_attn),
        }

        def on(machine: HardwareReport) -> LoadPlan:
            return plan_load(header, machine, chosen, extra_host_mib=self.settings.chat_memory_mib,
                             budget=budget_note(self.loaded))

        # The projector, when the model has one, takes its share first (bridge.companions.manager).
        return self.companions.plan_chat(path, self.planning_machine(), on)

    def planning_machine(self, report: HardwareReport | None = None) -> HardwareReport:
        """The machine plans are made for: free memory now, plus what the loaded model holds."""
        from ..hardware import probe

        report = report if report is not None else probe()
        learned_overheads(self.settings.data_dir).apply(report)
        return after_unload(report, self.loaded)

    def _check_allocation(self, model_id: str, plan: dict[str, Any], status: Any) -> dict[str, Any]:
        """Plan beside what llama.cpp allocated, per device; differences over 5% or 64 MiB are logged.
        Also measures what the new worker holds, for the next plans, and learns each GPU's overhead."""
        from ..hardware import probe

        report = probe()
        self.loaded = loaded_use(model_id, status.pid, status.allocation, report.usable_gpus)
        learned_overheads(self.settings.data_dir).learn(report.usable_gpus, self.loaded, status.allocation)
        actual = Allocation.from_dict(status.allocation)
        differences = compare(plan.get("planned", {}), actual)
        for diff in differences:
            log.warning("%s: %s", model_id, diff)
        return {"actual": status.allocation, "differences": [d.to_dict() for d in differences],
                "loaded_use": self.loaded.to_dict()}

    def respec(self, spec: LoadSpec, reason: str) -> LoadSpec:
        """After the engine crashed: when devices on other machines no longer answer, plan the model again
        without them (the engine loads that), or say why it cannot run without them."""
        gone = lost(spec.placement.rpc_servers) if spec.placement else []
        if not gone:
            return spec
        where = ", ".join(gone)
        registry.mark_lost(gone, f"the worker at {where} stopped answering ({reason}); left out of the plan")
        self.loaded = None  # the crashed worker's memory is free already
        try:
            planned = self._plan(read_file(spec.model_path), self._overrides)
        except BridgeError as exc:
            raise EngineError(f"the worker at {where} is gone and {spec.model_id} does not run without it: "
                              f"{exc.message}") from exc
        log.warning("the worker at %s is gone: loading %s again without it (%s)", where, spec.model_id,
                    planned.summary["reason"])
        self._respecced = planned.summary
        return dataclasses.replace(spec, n_ctx=planned.n_ctx, n_gpu_layers=planned.placement.n_gpu_layers,
                                   kv_type=planned.kv_type, flash_attn=planned.flash_attn,
                                   placement=planned.placement)

    def _after_restart(self) -> None:
        """The engine is back after a crash: with a new plan when a worker was planned out."""
        summary, self._respecced = self._respecced, None
        status = self.engine.status()
        if summary is not None and status.model_id:
            self.plan = summary | self._check_allocation(status.model_id, summary, status)

    async def _engine_load(self, spec: LoadSpec, cancel_running: bool) -> Any:
        if cancel_running:
            return await self.engine.load(spec, cancel_running=True)  # type: ignore[call-arg]
        return await self.engine.load(spec)

    def _announce_ready(self) -> None:
        """`ready`: what now serves, with the figures the extension shows and pushes into ST."""
        status = self.engine.status()
        if status.state != "ready" or not status.model_id:
            return
        self.bus.publish("ready", {
            "model": status.model_id,
            "model_id": status.model_id,
            "quant": self.info.file_type if self.info else None,
            "n_ctx": status.n_ctx,
            "gpu_layers": status.n_gpu_layers,
            "kv_type": status.kv_type,
            "flash_attn": status.flash_attn,
        })

    async def unload(self) -> None:
        async with self._lock:
            await self.engine.unload()
            self.info, self.plan, self.loaded = None, None, None
            self.bus.publish("model_unloaded", {})
            self.bus.publish("status", self.status_dict())

    async def load_at_start(self) -> None:
        """Load `--model`, else the model used last time; with neither, say how to get one."""
        model = self.settings.model or last_model(self.settings)
        if model is None:
            log.warning("%s", self.hint() or "no model is loaded")
            return
        try:
            await self.load(model, trusted=True)
            log.info("model %s is ready", self.model_name())
        except BridgeError as exc:
            log.error("could not load %s: %s", model, exc.message)

    def on_engine_event(self, name: str, data: dict[str, Any]) -> None:
        """The engine's events, under the names the management API documents (`loading` and its older
        name `load_progress`, `error`), with a fresh status whenever the engine's state changes. `ready`
        comes from `_load` once the swap is complete, or from here after a restart from a crash."""
        data = data | {"model": data.get("model_id")} if "model_id" in data else data
        if name == "loading":
            self.bus.publish("loading", data)
            self.bus.publish("load_progress", data)
            if data.get("progress") == 0.0:
                self.bus.publish("status", self.status_dict())
            return
        if name == "error":
            self.bus.publish("error", data)
        if name == "ready" and not self._lock.locked():
            self._after_restart()
            self._announce_ready()
        if name in ("ready", "error", "unloaded"):
            self.bus.publish("status", self.status_dict())

    # --- chat ---

    def render_chat(self, messages: list[dict[str, Any]]) -> tuple[str, list[str]]:
        """(prompt, extra stop strings) from the model's chat template (ChatML when it has none).

        The BOS text the template writes is cut off: the engine adds the real BOS token instead."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # jinja2 and llama_cpp: load lazily

        info = self.info
        template = self.engine.status().chat_template or CHATML
        bos = (info.bos_token if info else None) or ""
        eos = (info.eos_token if info else None) or ""
        try:
            rendered = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages)
        except Exception as exc:  # a template error is the model's, report it instead of a 500
            raise EngineError(f"the model's chat template failed: {exc}") from exc
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop] if rendered.stop else []
        starts_with_bos = bool(bos) and rendered.prompt.startswith(bos)
        prompt = rendered.prompt[len(bos) :] if starts_with_bos else rendered.prompt
        return prompt, [s for s in stops if s]


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- planning ----------------------------------------------------------------------------------------

def _gpu_layers(requested: Any, configured: int | None) -> int | None:
    if requested == "auto" or requested is None:
        return configured
    try:
        return int(requested)
    except ValueError as exc:
        raise BadRequest(f'gpu_layers must be a number or "auto", not {requested!r}') from exc


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def verdict_for(header: GGUFHeader, settings: Settings, report: Any) -> dict[str, Any] | None:
    """The planner's verdict for a model at the configured context, for the models list."""
    from .. import fit

    try:
        params = fit.FitParams(n_ctx=settings.ctx, extra_host_mib=settings.chat_memory_mib)
        result = fit.plan(header, report, params).to_dict()
    except Exception as exc:
        log.warning("the fit planner could not judge %s: %s", model_info(header).name, exc)
        return None
    keys = ("verdict", "reason", "n_ctx", "gpu_layers", "kv_type", "max_ctx", "max_ctx_full_gpu")
    return {key: result[key] for key in keys}


# --- routes ------------------------------------------------------------------------------------------


@routes.get("/bridge/v1/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[MANAGER_KEY].status_dict())


@routes.get("/bridge/v1/hardware")
async def hardware(request: web.Request) -> web.Response:
    from ..hardware import probe, report_to_dict  # imports llama_cpp and NVML: only when asked

    report = await asyncio.to_thread(probe)
    return web.json_response(report_to_dict(report))


@routes.get("/bridge/v1/models")
async def models(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    manager = request.app[MANAGER_KEY]
    found = await asyncio.to_thread(_describe_all, settings, manager)
    return web.json_response({"models_dir": str(settings.models_path), "models": found})


def _describe_all(settings: Settings, manager: ModelManager) -> list[dict[str, Any]]:
    loaded = manager.model_name()
    report = manager.planning_machine()  # the loaded model's own memory counts as free for its siblings
    described = []
    for model in library.scan(settings.models_path):
        entry: dict[str, Any] = {
            "id": model.id,
            "file": model.path.name,
            "size_bytes": model.size_bytes,
            "loaded": model.id == loaded,
        }
        try:
            header = read_file(model.path)
            info = model_info(header)
        except BridgeError as exc:
            described.append(entry | {"error": exc.message})
            continue
        entry |= {
            "architecture": info.architecture,
            "n_params": info.n_params,
            "quant": info.file_type,
            "n_ctx_train": info.n_ctx_train,
            "description": info.describe(),
        }
        described.append(entry | {"fit": verdict_for(header, settings, report)})
    return described


class SwapBody(LoadBody):
    """`POST /bridge/v1/load`: `model` (an id), or `quant` alone (the loaded model's sibling file of that
    quant), or only settings such as `ctx` (the loaded file again); `cancel_running` stops the generation
    under way instead of letting it finish first."""

    model: str | None = None  # type: ignore[assignment]
    quant: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-]{2,16}$")
    cancel_running: bool = False


@routes.post("/bridge/v1/load")
async def load(request: web.Request) -> web.Response:
    body = parse(SwapBody, await request.json())
    if body.model is not None:
        library.check_id(body.model)
        if body.quant is not None:
            raise BadRequest('give "model" or "quant", not both: "quant" switches the loaded model\'s quant')
    elif body.quant is None and body.ctx is None and not _settings_in(body):
        raise BadRequest('say what to load: "model" (an id), "quant" (of the loaded model) or "ctx"')
    result = await request.app[MANAGER_KEY].swap(
        body.model, quant=body.quant, cancel_running=body.cancel_running, ctx=body.ctx,
        gpu_layers=body.gpu_layers, kv_type=body.kv_type, flash_attn=body.flash_attn,
    )
    return web.json_response(result)


def _settings_in(body: SwapBody) -> bool:
    return any(value is not None for value in (body.gpu_layers, body.kv_type, body.flash_attn))


@routes.post("/bridge/v1/unload")
async def unload(request: web.Request) -> web.Response:
    await request.app[MANAGER_KEY].unload()
    return web.json_response(request.app[MANAGER_KEY].status_dict())


@routes.get("/bridge/v1/events")
async def events(request: web.Request) -> web.StreamResponse:
    response = await sse_open(request)
    request.app[STREAMS_KEY].add(asyncio.current_task())
    subscription = request.app[BUS_KEY].subscribe()
    try:
        while True:
            event = await subscription.next(timeout=PING_S)
            if event is None:
                await response.write(b": ping\n\n")
            else:
                await sse_send(response, event.data, event=event.name)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        subscription.close()
    return response


async def close_event_streams(app: web.Application) -> None:
    """on_shutdown: end open SSE streams, which would otherwise hold the shutdown for their timeout."""
    for task in list(app[STREAMS_KEY]):
        task.cancel()


async def watch_models_dir(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: `models_changed` events for the app's lifetime, as models are added and removed."""
    from ..watch import watch_models

    bus = app[BUS_KEY]
    task = asyncio.create_task(
        watch_models(app[SETTINGS_KEY].models_path, lambda change: bus.publish("models_changed", change)),
        name="st-bridge-models-watch",
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def snapshot(app: web.Application) -> Event:
    return Event("status", app[MANAGER_KEY].status_dict())
