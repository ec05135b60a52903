"""The app factory: `create_app(settings)` builds the aiohttp application with every dialect's routes.

Nothing lives in module globals: the settings, the engine, the event bus and the model manager are
reached through the typed keys in `bridge.api`. The engine's lifetime is a cleanup context: the model
named in the settings (or the last one used) starts loading in the background when the app starts, so
the server answers ST's status checks at once, and the worker is stopped when the app stops.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from .. import ports
from ..config import Settings
from ..events import EventBus
from ..reach import Reach
from ..workers.registry import registry
from . import (
    BUS_KEY,
    ENGINE_KEY,
    MANAGER_KEY,
    REACH_KEY,
    SETTINGS_KEY,
    EngineLike,
    catalog_routes,
    companion_routes,
    kobold,
    llamacpp,
    manage,
    openai,
    prompt_routes,
    workers_routes,
)
from .middleware import middlewares

log = logging.getLogger(__name__)

__all__ = ["BUS_KEY", "ENGINE_KEY", "MANAGER_KEY", "SETTINGS_KEY", "create_app"]

START_TASK_KEY = web.AppKey("start_task", asyncio.Task)


def create_app(settings: Settings, engine: EngineLike | None = None) -> web.Application:
    """The bridge's application. `engine` replaces the real llama.cpp worker (tests of translation only)."""
    app = web.Application(middlewares=middlewares(), client_max_size=settings.max_body_bytes)
    app[SETTINGS_KEY] = settings
    registry.configure(settings.rpc_servers, settings.workers)
    app[REACH_KEY] = Reach.build(settings.allowed_origins, settings.allowed_hosts, settings.host,
                                 docker=settings.docker)
    bus = EventBus(snapshot=lambda: manage.snapshot(app))
    app[BUS_KEY] = bus
    app[ENGINE_KEY] = engine or _real_engine(
        settings, _on_loop(lambda n, d: app[MANAGER_KEY].on_engine_event(n, d))
    )
    app[MANAGER_KEY] = manage.ModelManager(settings, app[ENGINE_KEY], bus)
    if engine is None:  # after a crash, a lost worker machine is planned out of the reload
        app[ENGINE_KEY].respec = app[MANAGER_KEY].respec  # type: ignore[attr-defined]
    app[manage.STREAMS_KEY] = weakref.WeakSet()
    for module in (openai, kobold, llamacpp, manage, workers_routes, prompt_routes, companion_routes):
        app.add_routes(module.routes)
    catalog_routes.add_routes(app)
    app.cleanup_ctx.append(_engine_lifetime)
    app.cleanup_ctx.append(manage.watch_models_dir)
    app.on_shutdown.append(manage.close_event_streams)
    return app


def _real_engine(settings: Settings, on_event: Callable[[str, dict], None]) -> EngineLike:
    from ..engine.client import Engine  # the engine pulls in multiprocessing machinery: only when serving

    return Engine(max_queue=settings.max_queue, on_event=on_event, hang_timeout_s=settings.stall_timeout_s,
                  load_stall_s=settings.load_stall_s, load_timeout_s=settings.load_timeout_s)


def _on_loop(handle: Callable[[str, dict], None]) -> Callable[[str, dict], None]:
    """Engine events handled on the event loop's thread, whichever thread the engine calls from."""
    loop: asyncio.AbstractEventLoop | None = None

    def forward(name: str, data: dict[str, Any]) -> None:
        nonlocal loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if loop is not None:
                loop.call_soon_threadsafe(handle, name, data)
            return
        handle(name, data)

    return forward


async def _engine_lifetime(app: web.Application) -> AsyncIterator[None]:
    app[START_TASK_KEY] = asyncio.create_task(_start(app))
    yield
    start = app[START_TASK_KEY]
    if not start.done():
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
    await app[ENGINE_KEY].close()
    await app[MANAGER_KEY].companions.close()


async def _start(app: web.Application) -> None:
    """Check the workers and RPC servers first (the plan counts their devices), then load the model."""
    for remote in await asyncio.to_thread(registry.refresh):
        if remote.state != "ready":
            log.warning("%s", remote.message)
    # Companions first: the chat model is then planned on what they leave (bridge.companions).
    await app[MANAGER_KEY].companions.load_at_start()
    await app[MANAGER_KEY].load_at_start()


def serve(settings: Settings) -> None:
    """Run the bridge until interrupted (the `st-bridge serve` command)."""
    from ..config import check_exposure

    check_exposure(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    hosts = listen_hosts(settings, app[REACH_KEY])
    url = f"http://{settings.host}:{settings.port}"
    log.info("listening on %s (models in %s)", ", ".join(f"{h}:{settings.port}" for h in hosts),
             settings.models_path)
    log.info("in SillyTavern: API Connections → Text Completion → KoboldCpp (or llama.cpp), URL %s", url)
    # handler_cancellation: a client that hangs up cancels its handler, which stops its generation.
    try:
        web.run_app(
            app,
            host=hosts,
            port=settings.port,
            handler_cancellation=True,
            print=None,
            access_log=None,
        )
    except OSError as exc:  # a busy or forbidden port: one line for the user, not a traceback
        problem = ports.explain(exc, settings.host, settings.port)
        if problem is None:
            raise
        raise problem from exc


def listen_hosts(settings: Settings, reach: Reach) -> list[str]:
    """The addresses to listen on: the configured one, plus Docker's bridge gateways with `--docker`."""
    if not settings.docker or settings.host in ("0.0.0.0", "::", ""):  # a wildcard covers the gateways
        return [settings.host]
    if not reach.docker:
        log.warning("--docker: no Docker bridge network (docker0, br-*) on this machine, so containers "
                    "cannot reach the bridge; start Docker first, then the bridge. (Docker Desktop on "
                    "Windows and macOS needs no --docker: host.docker.internal reaches 127.0.0.1.)")
        return [settings.host]
    log.info("Docker: also listening on %s for containers (%s)", ", ".join(reach.docker_gateways),
             ", ".join(f"{n.interface} {n.network}" for n in reach.docker))
    return [settings.host, *[g for g in reach.docker_gateways if g != settings.host]]
