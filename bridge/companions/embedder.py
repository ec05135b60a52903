"""The server-side handle of the embedding worker: load, embed one batch at a time, unload, recover.

The worker is the engine's (`bridge.engine.client._Worker`: a spawned process, a pipe, a reader thread
that turns it into an asyncio queue) with `embedding_worker.run` as its entry point, so a crash inside
llama.cpp ends only that process: the request that was running fails with the reason, and the same model
is loaded again in the background (at most MAX_CRASHES_IN_WINDOW times a minute, as the engine does).

States: empty -> loading -> ready; a failed load leaves `error` with the reason; `unload` -> empty.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..engine.client import CRASH_WINDOW_S, MAX_CRASHES_IN_WINDOW, _crash_reason, _Worker
from ..errors import EngineError, NotLoaded
from . import embedding_worker
from .embedding_worker import EmbeddingSpec

log = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]
LOAD_TIMEOUT_S = 600.0


class Embedder:
    """One embedding model in its own worker process."""

    def __init__(self, on_event: EventCallback | None = None, hang_timeout_s: float = 120.0) -> None:
        self.hang_timeout_s = hang_timeout_s
        self._on_event = on_event
        self._lock = asyncio.Lock()  # one batch, load or unload at a time
        self._worker: _Worker | None = None
        self.spec: EmbeddingSpec | None = None
        self.info: dict[str, Any] = {}
        self.state = "empty"
        self.error: str | None = None
        self._ids = itertools.count(1)
        self._crashes: list[float] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifetime ---------------------------------------------------------------------------------------

    async def load(self, spec: EmbeddingSpec) -> dict[str, Any]:
        """Replace the loaded embedding model with `spec`'s; raises EngineError when it cannot load (then
        nothing is loaded: the old one is gone, and ST's index must be rebuilt for the new one anyway)."""
        async with self._lock:
            await self._stop()
            await self._start(spec)
            return self.info

    async def unload(self) -> None:
        async with self._lock:
            await self._stop()
            self.spec, self.info, self.state, self.error = None, {}, "empty", None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._stop()
        self.state = "empty"

    @property
    def pid(self) -> int | None:
        return self._worker.pid if self._worker else None

    async def _start(self, spec: EmbeddingSpec) -> None:
        self.spec, self.state, self.error, self.info = spec, "loading", None, {}
        worker = _Worker(spec=spec, loop=asyncio.get_running_loop(),  # type: ignore[arg-type]
                         on_exit=self._on_exit, target=embedding_worker.run, kind="embedding")
        await asyncio.to_thread(worker.start)
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                message = await worker.messages.get()
        except TimeoutError:
            message = ("load_error", f"it had not loaded after {LOAD_TIMEOUT_S:g} s")
        if message[0] == "ready":
            self._worker, self.info, self.state = worker, message[1], "ready"
            self._emit("embedding_ready", {"model": spec.model_id, **self.info})
            return
        reason = message[1] if message[0] == "load_error" else _crash_reason(worker, message[1])
        worker.stopping = True
        await worker.stop(grace_s=2.0)
        self.state, self.error = "error", f"could not load the embedding model {spec.model_id}: {reason}"
        self._emit("error", {"model": spec.model_id, "message": self.error})
        raise EngineError(self.error)

    async def _stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.stop()

    # --- embedding ---------------------------------------------------------------------------------------

    async def embed(self, texts: list[str]) -> tuple[list[np.ndarray], int, int]:
        """(raw pooled vectors in order, tokens evaluated, texts cut to the context)."""
        async with self._lock:
            worker = self._worker
            if worker is None or self.state != "ready":
                raise NotLoaded(self.error or "no embedding model is loaded: pick one in the st-bridge panel "
                                "(Companions), or POST /bridge/v1/companions/embedding {\"model\": \"<id>\"}")
            request_id = next(self._ids)
            if not worker.send(("embed", request_id, texts)):
                raise self._crashed(worker, "the embedding process is gone")
            return await self._answer(worker, request_id)

    async def _answer(self, worker: _Worker, request_id: int) -> tuple[list[np.ndarray], int, int]:
        while True:
            try:
                async with asyncio.timeout(self.hang_timeout_s):
                    message = await worker.messages.get()
            except TimeoutError:
                why = f"the embedding model did not answer for {self.hang_timeout_s:g} s (it hung)"
                raise self._crashed(worker, why) from None
            if message[0] == "dead":
                raise self._crashed(worker, _crash_reason(worker, message[1]))
            if len(message) < 3 or message[1] != request_id:
                continue
            if message[0] == "rejected":
                raise EngineError(message[2])
            return message[2], message[3], message[4]

    # --- crashes -----------------------------------------------------------------------------------------

    def _on_exit(self, worker: _Worker) -> None:
        if not worker.stopping and worker is self._worker:
            self._crashed(worker, _crash_reason(worker, worker.process.exitcode))

    def _crashed(self, worker: _Worker, reason: str) -> EngineError:
        """Note the crash, reload the same model in the background, and return the error to raise."""
        if not worker.crash_handled and worker is self._worker:
            worker.crash_handled = True
            worker.kill()
            self._worker = None
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW_S] + [now]
            self.state, self.error = "loading", f"{reason}; restarting it"
            log.warning("embedding: %s", self.error)
            self._emit("error", {"model": worker.spec.model_id, "message": self.error})
            if len(self._crashes) > MAX_CRASHES_IN_WINDOW:
                self.state = "error"
                self.error = f"{reason}; it crashed {len(self._crashes)} times in a minute"
            else:
                self._spawn(self._restart(worker.spec))  # type: ignore[arg-type]
        return EngineError(f"{reason}; the embedding model is being loaded again, retry in a moment")

    async def _restart(self, spec: EmbeddingSpec) -> None:
        async with self._lock:
            if self._worker is not None or self.spec is not spec:
                return  # a load or an unload came first
            try:
                await self._start(spec)
            except EngineError as exc:
                log.error("embedding: restart failed: %s", exc.message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event, data)
            except Exception:
                log.exception("embedding event listener failed on %s", event)
