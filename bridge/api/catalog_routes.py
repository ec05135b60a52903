"""Catalog, recommendations, quants and downloads under `/bridge/v1` (for the ST panel).

    GET    /bridge/v1/catalog                      the catalog (bundled, or refreshed from the Hub)
    GET    /bridge/v1/recommend?ctx=&limit=&gpu_mib=&ram_mib=
                                                   the same JSON as `st-bridge recommend --json`
    GET    /bridge/v1/models/{id}/quants?ctx=      the quants of a local model's (or a catalog) repository,
                                                   local and downloadable, each with its verdict badge
    POST   /bridge/v1/downloads                    {repo, file} or {repo, quant} (neither: the best that fits)
    GET    /bridge/v1/downloads                    every download: bytes, rate, ETA, state
    DELETE /bridge/v1/downloads/{id}               cancel (partial data removed)
    DELETE /bridge/v1/models/{id}                  delete a local model (all its shards)

Handlers only translate: the logic is in `bridge.recommend`, `bridge.downloads` and `bridge.library`.
Download events (`download_progress`, `download_done`, `download_error`, `download_cancelled`) go to the
app's event bus, so `GET /bridge/v1/events` streams them.

While serving, the catalog refreshes itself in the background (`refresh_in_background`, setting
`catalog_refresh`): when the cached catalog is older than `catalog_ttl_hours` and the Hub answers, sizes
and sha256 are taken from the Hub and trusted uploaders' repositories are added; a change is announced as
`catalog_updated`. Offline, one log line says so and the bundled (or cached) catalog keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from .. import calibrate, catalog, library, recommend, speed
from ..downloads import DownloadManager
from ..errors import BadRequest, Conflict, HubUnavailable
from ..events import EventBus
from ..hardware import HardwareReport, probe
from ..hub import HubClient
from . import BUS_KEY, MANAGER_KEY, SETTINGS_KEY

log = logging.getLogger(__name__)

DOWNLOADS_KEY = web.AppKey("downloads", DownloadManager)
# The hardware probe: NVML and llama_cpp are its boundary, so tests may hand in a fixed report instead.
PROBE_KEY: web.AppKey[Callable[[], HardwareReport]] = web.AppKey("hardware_probe")
LOOP_KEY = web.AppKey("downloads_loop", dict)
REFRESH_KEY = web.AppKey("catalog_refresh", asyncio.Task)

routes = web.RouteTableDef()


def add_routes(app: web.Application) -> None:
    """Add the catalog and download routes, and the download manager publishing to the app's event bus."""
    if DOWNLOADS_KEY in app:
        return  # already added
    settings = app[SETTINGS_KEY]
    holder: dict[str, asyncio.AbstractEventLoop] = {}
    app[LOOP_KEY] = holder
    app[DOWNLOADS_KEY] = DownloadManager(
        settings.models_path, HubClient(), on_event=_publisher(app[BUS_KEY], holder)
    )
    app[PROBE_KEY] = probe
    app.on_startup.append(_remember_loop)
    app.cleanup_ctx.append(refresh_in_background)
    app.add_routes(routes)


async def _remember_loop(app: web.Application) -> None:
    app[LOOP_KEY]["loop"] = asyncio.get_running_loop()


def _publisher(bus: EventBus, holder: dict[str, asyncio.AbstractEventLoop]) -> Callable[[str, dict], None]:
    """Download events come from the manager's worker thread: hand them to the event loop's thread."""

    def publish(name: str, data: dict[str, Any]) -> None:
        loop = holder.get("loop")
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(bus.publish, name, data)

    return publish


# --- catalog refresh while serving --------------------------------------------------------------------


async def refresh_in_background(app: web.Application) -> AsyncIterator[None]:
    """Start a catalog refresh beside the server (never before it answers); stop it when the app stops."""
    if not app[SETTINGS_KEY].catalog_refresh:
        yield
        return
    stop = threading.Event()
    app[REFRESH_KEY] = asyncio.create_task(_refresh_when_stale(app, stop))
    yield
    # The refresh runs in a thread that cannot be interrupted mid-request: `stop` makes it skip the rest.
    stop.set()
    app[REFRESH_KEY].cancel()
    await asyncio.gather(app[REFRESH_KEY], return_exceptions=True)


async def _refresh_when_stale(app: web.Application, stop: threading.Event) -> None:
    settings = app[SETTINGS_KEY]
    if not await asyncio.to_thread(catalog.is_stale, settings.data_dir, settings.catalog_ttl_hours * 3600):
        return
    try:
        cat, changed = await asyncio.to_thread(_refresh_catalog, settings, stop)
    except HubUnavailable as exc:
        log.info("catalog not refreshed, the bundled or cached one serves: %s", exc.message)
        return
    if changed:
        discovered = [m.repo for m in cat.models if m.source == "discovered"]
        app[BUS_KEY].publish(
            "catalog_updated",
            {"origin": cat.origin, "refreshed_at": cat.refreshed_at, "models": len(cat.models),
             "discovered": discovered},
        )  # fmt: skip


def _refresh_catalog(settings: Any, stop: threading.Event) -> tuple[catalog.Catalog, bool]:
    """Sizes and sha256 of every file, and one header of each discovered model (each full header read
    costs megabytes, so reading all of them is left to `st-bridge catalog refresh`)."""
    hub = HubClient()
    hub.ping()  # offline: one quick failure instead of one slow one per repository
    kept: list[str] = []
    cat, changed = catalog.refresh_cache(
        settings.data_dir, hub, authors=settings.trusted_uploaders, read_headers=False, log=kept.append,
        stop=stop,
    )  # fmt: skip
    if stop.is_set():
        return cat, False
    for message in kept:
        log.debug("catalog refresh: %s", message)
    log.info(
        "catalog refreshed from %s: %d models (%d could not be read)%s",
        hub.endpoint, len(cat.models), len(kept), "" if changed else ", nothing changed",
    )  # fmt: skip
    return cat, changed


# --- catalog and recommendations ---------------------------------------------------------------------


@routes.get("/bridge/v1/catalog")
async def get_catalog(request: web.Request) -> web.Response:
    cat = await asyncio.to_thread(catalog.load, request.app[SETTINGS_KEY].data_dir)
    return web.json_response(cat.to_dict())


@routes.get("/bridge/v1/recommend")
async def get_recommend(request: web.Request) -> web.Response:
    q = request.query
    n_ctx = _int(q, "ctx", recommend.DEFAULT_CTX)
    limit = _int(q, "limit", None)
    gpu_mib = [_to_int("gpu_mib", v) for item in q.getall("gpu_mib", []) for v in item.split(",") if v]
    ram_mib = _int(q, "ram_mib", None)
    rec = await asyncio.to_thread(_recommend, request.app, n_ctx, limit, gpu_mib or None, ram_mib)
    return web.json_response(rec)


def _recommend(
    app: web.Application, n_ctx: int, limit: int | None, gpu_mib: list[int] | None, ram_mib: int | None
) -> dict[str, Any]:
    report = _machine(app, gpu_mib, ram_mib)
    cat = catalog.load(app[SETTINGS_KEY].data_dir)
    return recommend.recommend(cat, report, n_ctx=n_ctx, limit=limit, cpu=_cpu(app, report)).to_dict()


@routes.get("/bridge/v1/models/{id:.+}/quants")
async def get_quants(request: web.Request) -> web.Response:
    model = request.match_info["id"]
    n_ctx = _int(request.query, "ctx", recommend.DEFAULT_CTX)
    result = await asyncio.to_thread(_quants, request.app, model, n_ctx)
    return web.json_response(result)


def _quants(app: web.Application, model: str, n_ctx: int) -> dict[str, Any]:
    settings = app[SETTINGS_KEY]
    cat = catalog.load(settings.data_dir)
    report = _machine(app, None, None)
    cpu = _cpu(app, report)
    # A catalog repository's name is no file; a local id (or the loaded model's) is.
    path = None if cat.find(model) else app[MANAGER_KEY].model_file(model)
    return recommend.model_quants(cat, settings.models_path, model, report, n_ctx=n_ctx, cpu=cpu, path=path)


def _cpu(app: web.Application, report: HardwareReport) -> speed.CpuSpeed:
    """This machine's CPU figures: measured on the first recommendation (`speed_probe`), then cached."""
    settings = app[SETTINGS_KEY]
    return calibrate.cpu_speed(settings.data_dir, report, measure_missing=settings.speed_probe)


def _machine(app: web.Application, gpu_mib: list[int] | None, ram_mib: int | None) -> HardwareReport:
    """The machine to recommend for: with a model loaded, the memory it holds counts as free (picking
    another model replaces it); a what-if replaces the figures altogether."""
    report = app[PROBE_KEY]()
    if gpu_mib is None and ram_mib is None:
        return app[MANAGER_KEY].planning_machine(report)
    return recommend.what_if_machine(report, gpu_mib, ram_mib)


# --- downloads ---------------------------------------------------------------------------------------


@routes.post("/bridge/v1/downloads")
async def start_download(request: web.Request) -> web.Response:
    body = await request.json()
    if not isinstance(body, dict) or not isinstance(body.get("repo"), str) or not body["repo"]:
        raise BadRequest('send {"repo": "owner/name", "quant": "Q5_K_M"} or {"repo": ..., "file": ...}')
    repo, quant, file = body["repo"], _opt_str(body, "quant"), _opt_str(body, "file")
    dl = await asyncio.to_thread(_submit, request.app, repo, quant, file)
    return web.json_response(dl, status=202)


def _submit(app: web.Application, repo: str, quant: str | None, file: str | None) -> dict[str, Any]:
    if not quant and not file:
        file = _best_file(app, repo)
    return app[DOWNLOADS_KEY].submit(repo, quant=quant, file=file).to_dict()


def _best_file(app: web.Application, repo: str) -> str:
    cat = catalog.load(app[SETTINGS_KEY].data_dir)
    best = recommend.best_quant(recommend.quants(cat, repo, _machine(app, None, None)))
    if best is None:
        raise BadRequest(f'no quant of {repo} runs well on this machine; name one with "quant"')
    return best.file


@routes.get("/bridge/v1/downloads")
async def list_downloads(request: web.Request) -> web.Response:
    return web.json_response({"downloads": [d.to_dict() for d in request.app[DOWNLOADS_KEY].list()]})


@routes.delete("/bridge/v1/downloads/{id}")
async def cancel_download(request: web.Request) -> web.Response:
    dl = request.app[DOWNLOADS_KEY].cancel(request.match_info["id"])
    return web.json_response(dl.to_dict())


# --- local models ------------------------------------------------------------------------------------


@routes.delete("/bridge/v1/models/{id:.+}")
async def delete_model(request: web.Request) -> web.Response:
    model = library.check_id(request.match_info["id"])
    found = library.resolve(request.app[SETTINGS_KEY].models_path, model)
    if request.app[MANAGER_KEY].model_name() == found.id:
        raise Conflict(f"{found.id} is loaded: unload it first (POST /bridge/v1/unload)", model=found.id)
    removed = await asyncio.to_thread(request.app[DOWNLOADS_KEY].delete, found.path)
    return web.json_response({"deleted": found.id, "files": [p.name for p in removed]})


# --- query and body fields ---------------------------------------------------------------------------


def _int(query: Any, name: str, default: int | None) -> int | None:
    value = query.get(name)
    return default if value in (None, "") else _to_int(name, value)


# The largest value of each numeric query parameter: a context, a list length, MiB of GPU memory and RAM.
QUERY_MAX = {"ctx": 1 << 24, "limit": 1000, "gpu_mib": 1 << 24, "ram_mib": 1 << 26}


def _to_int(name: str, value: str) -> int:
    limit = QUERY_MAX[name]
    number = int(value) if value.isascii() and value.isdigit() and len(value) <= 12 else None
    if number is None or number > limit:
        raise BadRequest(f"{name} must be a whole number from 0 to {limit}, not {value[:40]!r}")
    return number


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return value
