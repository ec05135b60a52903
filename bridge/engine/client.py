"""The server-side handle of the engine worker: loads, a FIFO of generations, cancellation, recovery.

The worker (`worker.py`) runs in a spawned child process, so a crash, an out-of-memory kill or a hang inside
llama.cpp never takes the HTTP server down. A reader thread per worker turns its pipe into an asyncio queue.
When the worker dies (or stops producing tokens for `hang_timeout_s`) the running request ends with
`stop_type="error"` and a message, and the same model is loaded again in the background; requests that
queued meanwhile are served once it is back.

Tokenization never touches the worker: `Vocab` loads the same file's vocabulary in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from bridge.engine import worker as worker_module
from bridge.engine.turns import Turns
from bridge.engine.types import (
    EngineState,
    EngineStatus,
    GenerationRequest,
    GenerationResult,
    LoadSpec,
    TokenChunk,
)
from bridge.engine.vocab import Vocab
from bridge.errors import BadRequest, Busy, EngineError

log = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]
# A crashed worker is restarted, at most MAX_CRASHES_IN_WINDOW times within CRASH_WINDOW_S: one more crash in
# that time leaves the engine in the "error" state.
CRASH_WINDOW_S = 60.0
MAX_CRASHES_IN_WINDOW = 3
RETRY_AFTER_S = 5  # what a request refused by a full queue is told (HTTP Retry-After)


@dataclass
class _Worker:
    """One worker process, its pipe, and the queue its reader thread fills."""

    spec: LoadSpec
    loop: asyncio.AbstractEventLoop
    on_exit: Callable[[_Worker], None]
    messages: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    stopping: bool = False  # we are stopping it: its exit is not a crash
    crash_handled: bool = False
    # The child's entry point: the chat engine's, or a companion's (bridge.companions), same lifecycle.
    target: Callable[..., None] = worker_module.run
    kind: str = "engine"

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=self.target, args=(child, self.spec), daemon=True,
                                       name=f"st-bridge-{self.kind}-{self.spec.model_id}")
        self.process.start()
        child.close()  # only the child holds its end now, so its death reads as EOF here
        threading.Thread(target=self._read, daemon=True, name="st-bridge-engine-reader").start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def send(self, message: tuple[Any, ...]) -> bool:
        """False when the pipe is gone (the worker died)."""
        try:
            self.conn.send(message)
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Ask it to exit, then kill it if it does not."""
        self.stopping = True
        self.send(("shutdown",))
        await asyncio.to_thread(self.process.join, grace_s)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, grace_s)
        self.conn.close()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if not self._post(message):
                return
        self.process.join(5)
        self._post(("dead", self.process.exitcode))
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is left to tell
            self.loop.call_soon_threadsafe(self.on_exit, self)

    def _post(self, message: tuple[Any, ...]) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.messages.put_nowait, message)
            return True
        except RuntimeError:
            return False


def _crash_reason(worker: _Worker, exitcode: int | None) -> str:
    """Why the worker died; when it used devices on other machines that no longer answer, it names them
    (llama.cpp aborts the process whose RPC connection breaks)."""
    reason = _exit_reason(exitcode)
    placement = worker.spec.placement
    if placement is None or not placement.rpc_servers:
        return reason
    from bridge.workers.registry import lost

    gone = lost(placement.rpc_servers)
    if not gone:
        return reason
    return (f"the worker at {', '.join(gone)} stopped answering "
            f"({reason}: llama.cpp aborts when a worker is lost)")


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (often the system's out-of-memory killer)" if name == "SIGKILL" else ""
        return f"the engine process was killed by {name}{hint}"
    return f"the engine process exited unexpectedly (exit code {exitcode})"


class Engine:
    """Server-side handle of the llama.cpp worker process (one loaded model at a time)."""

    def __init__(self, *, max_queue: int = 16, on_event: EventCallback | None = None,
                 hang_timeout_s: float = 120.0, cancel_timeout_s: float = 30.0,
                 load_stall_s: float = 300.0, load_timeout_s: float = 3600.0,
                 respec: Callable[[LoadSpec, str], LoadSpec] | None = None) -> None:
        self.max_queue = max_queue
        # After a crash: the spec to load again (a worker machine that vanished is planned out of it), or an
        # EngineError saying why the model cannot run without it. None: the same spec.
        self.respec = respec
        # A generation is hung when the worker reports no progress for this long. Progress is every
        # message: a token, a prompt batch done, or a heartbeat from inside llama.cpp's compute
        # (engine/progress.py), so a batch that takes minutes on a slow machine is not mistaken for a hang.
        self.hang_timeout_s = hang_timeout_s
        self.load_stall_s = load_stall_s  # a load with no progress message for this long is stopped
        self.load_timeout_s = load_timeout_s  # and one that has not finished after this long
        self.cancel_timeout_s = cancel_timeout_s
        self._on_event = on_event
        self._turns = Turns()
        self._admin: asyncio.Lock | None = None
        self._worker: _Worker | None = None
        self._spec: LoadSpec | None = None
        self._vocab: Vocab | None = None
        self._info: dict[str, Any] = {}
        self._state: EngineState = "empty"
        self._error: str | None = None
        self._progress = 0.0
        self._ids = itertools.count(1)
        self._running_id: int | None = None
        self._crashes: list[float] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # ---- loading -------------------------------------------------------------------------------------

    async def load(self, spec: LoadSpec, *, cancel_running: bool = False) -> EngineStatus:
        """Load `spec` (replacing the current model once the running generation ends, or at once with
        `cancel_running`). On failure the previous model is loaded back and EngineError says why."""
        self._check_open()
        # Held from this moment (before any await): a request that arrives while the swap is under way
        # waits in the queue and is served by the new model, never by the old one in between.
        self._turns.block()
        try:
            try:
                vocab = await asyncio.to_thread(self._read_vocab, spec)
            except EngineError as exc:  # unreadable: the current model is untouched
                self._emit("error", {"model_id": spec.model_id, "message": exc.message})
                raise
            async with self._exclusive(cancel_running):
                await self._swap(spec, vocab)
        finally:
            self._turns.unblock()
        return self.status()

    async def _swap(self, spec: LoadSpec, vocab: Vocab) -> None:
        """Replace the worker (the turns are idle and held); on failure bring the previous model back."""
        previous = self._spec if self._state == "ready" else None
        await self._stop_worker()
        try:
            await self._start(spec)
        except EngineError:
            vocab.close()
            if previous is not None:
                await self._restore(previous)
            raise
        self._set_vocab(vocab)

    async def unload(self) -> None:
        async with self._exclusive(cancel_running=False):
            await self._stop_worker()
            self._spec, self._info, self._state, self._error = None, {}, "empty", None
            self._set_vocab(None)
        self._emit("unloaded", {})

    def status(self) -> EngineStatus:
        info = self._info
        return EngineStatus(
            state=self._state,
            model_id=self._spec.model_id if self._spec else None,
            model_path=self._spec.model_path if self._spec else None,
            n_ctx=info.get("n_ctx", 0),
            n_gpu_layers=info.get("n_gpu_layers", 0),
            kv_type=info.get("kv_type", "f16"),
            flash_attn=info.get("flash_attn", False),
            chat_template=info.get("chat_template", ""),
            queue_length=self._turns.waiting,
            error=self._error,
            load_progress=self._progress,
            allocation=info.get("allocation", {}),
            pid=info.get("pid"),
            vision=info.get("vision", {}),
        )

    @property
    def worker_pid(self) -> int | None:
        """The worker process id (for diagnostics), or None when none runs."""
        return self._worker.pid if self._worker else None

    @staticmethod
    def _read_vocab(spec: LoadSpec) -> Vocab:
        return Vocab(spec.model_path)

    def _set_vocab(self, vocab: Vocab | None) -> None:
        old, self._vocab = self._vocab, vocab
        if old is not None:
            old.close()

    async def _start(self, spec: LoadSpec) -> None:
        """Start a worker for `spec` and wait until it is ready; raises EngineError if it cannot load."""
        self._spec, self._state, self._error, self._progress, self._info = spec, "loading", None, 0.0, {}
        self._emit("loading", {"model_id": spec.model_id, "progress": 0.0})
        worker = _Worker(spec=spec, loop=asyncio.get_running_loop(), on_exit=self._on_worker_exit)
        await asyncio.to_thread(worker.start)  # spawning a process takes a moment: not on the event loop
        deadline = time.monotonic() + self.load_timeout_s
        while True:
            message = await self._load_message(worker, deadline)
            kind = message[0]
            if kind == "progress":
                self._progress = message[1]
                self._emit("loading", {"model_id": spec.model_id, "progress": message[1]})
            elif kind == "ready":
                self._worker, self._info, self._state, self._progress = worker, message[1], "ready", 1.0
                self._emit("ready", {"model_id": spec.model_id, **message[1]})
                return
            else:
                reason = message[1] if kind == "load_error" else _crash_reason(worker, message[1])
                worker.stopping = True
                await worker.stop(grace_s=2.0)
                self._state, self._error = "error", f"could not load {spec.model_id}: {reason}"
                self._emit("error", {"model_id": spec.model_id, "message": self._error})
                raise EngineError(self._error)

    async def _load_message(self, worker: _Worker, deadline: float) -> tuple[Any, ...]:
        """The loading worker's next message; a load that stalls or overruns becomes a load error."""
        wait = min(self.load_stall_s, deadline - time.monotonic())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                return await worker.messages.get()
        except TimeoutError:
            why = (f"it reported no progress for {self.load_stall_s:g} s" if wait >= self.load_stall_s
                   else f"it had not finished after {self.load_timeout_s:g} s")
            log.error("engine: stopping the load of %s: %s", worker.spec.model_id, why)
            return ("load_error", f"the load was stopped: {why}")

    async def _restore(self, spec: LoadSpec) -> None:
        """Bring the previous model back after a failed swap (its vocabulary is still loaded)."""
        failed_error = self._error
        try:
            await self._start(spec)
        except EngineError:
            self._set_vocab(None)
            return
        self._error = failed_error  # keep saying why the swap failed

    async def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.stop()

    @asynccontextmanager
    async def _exclusive(self, cancel_running: bool) -> AsyncIterator[None]:
        """Hold new generations, wait for the running one (or abort it), and keep other loads out."""
        if self._admin is None:
            self._admin = asyncio.Lock()
        self._turns.block()
        try:
            async with self._admin:
                if cancel_running:
                    await self.abort()
                await self._turns.wait_idle()
                yield
        finally:
            self._turns.unblock()

    # ---- crashes -------------------------------------------------------------------------------------

    def _on_worker_exit(self, worker: _Worker) -> None:
        """The reader saw the worker's pipe close: if nobody stopped it, it crashed."""
        if worker.stopping or worker is not self._worker:
            return
        self._begin_restart(worker, _crash_reason(worker, worker.process.exitcode))

    def _begin_restart(self, worker: _Worker, reason: str) -> None:
        """Hold new turns at once (synchronously), then reload the same model in the background."""
        if worker.crash_handled or self._closed:
            return
        worker.crash_handled = True
        worker.kill()
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW_S] + [now]
        self._state, self._error = "loading", f"{reason}; restarting it"
        log.warning("engine: %s; restarting %s", reason, worker.spec.model_id)
        self._emit("error", {"model_id": worker.spec.model_id, "message": self._error})
        if len(self._crashes) > MAX_CRASHES_IN_WINDOW:
            self._state, self._error = "error", f"{reason}; it crashed {len(self._crashes)} times in a minute"
            self._worker = None
            return
        self._turns.block()
        self._spawn(self._restart(worker))

    async def _restart(self, crashed: _Worker) -> None:
        try:
            async with self._exclusive(cancel_running=False):
                if self._worker is not crashed or self._closed:
                    return  # a load or close replaced it meanwhile
                self._worker = None
                try:
                    spec = crashed.spec
                    if self.respec is not None:
                        spec = await asyncio.to_thread(self.respec, spec, self._error or "")
                    await self._start(spec)
                except EngineError as exc:
                    log.error("engine: restart failed: %s", exc)
                    self._state, self._error = "error", exc.message
                    self._emit("error", {"model_id": crashed.spec.model_id, "message": exc.message})
        finally:
            self._turns.unblock()

    # ---- generation ----------------------------------------------------------------------------------

    def generate(self, req: GenerationRequest) -> AsyncIterator[TokenChunk | GenerationResult]:
        """Stream of TokenChunk, then one GenerationResult. Raises Busy at once when the queue is full."""
        self._check_queue()
        return self._generate(req)

    async def abort(self) -> bool:
        """Stop the running generation (it ends with stop_type "abort"); False when none is running."""
        if self._running_id is None or self._worker is None:
            return False
        return self._worker.send(("cancel", self._running_id))

    def _check_queue(self) -> None:
        """`max_queue` bounds the requests that wait; one that would run at once is never refused."""
        if not self._turns.free and self._turns.waiting >= self.max_queue:
            raise Busy(f"{self._turns.waiting} requests are already waiting for the model (at most "
                       f"{self.max_queue} may); try again shortly", retry_after_s=RETRY_AFTER_S)

    async def _generate(self, req: GenerationRequest) -> AsyncIterator[TokenChunk | GenerationResult]:
        self._check_open()
        self._check_queue()
        await self._turns.acquire()
        request_id = next(self._ids)
        worker = self._worker
        turn = {"held": True}

        def release() -> None:
            # Before the result is yielded: a consumer may stop iterating as soon as it has it.
            if turn["held"]:
                turn["held"] = False
                self._running_id = None
                self._turns.release()

        try:
            if worker is None or self._state != "ready":
                raise EngineError(self._error or "no model is loaded: load one first")
            self._running_id = request_id
            if not worker.send(("generate", request_id, req)):
                result = self._crashed(worker, "the engine process is gone")
                release()
                yield result
                return
            async with aclosing(self._stream(worker, request_id)) as stream:
                async for item in stream:
                    if isinstance(item, GenerationResult):
                        item.model_id = worker.spec.model_id
                        release()
                    yield item
        except BadRequest:
            release()  # the worker rejected the request: it is idle again
            raise
        finally:
            if turn["held"] and worker is not None and self._running_id == request_id:
                # The consumer left early: stop the worker; the turn passes on once it has stopped.
                turn["held"] = False
                self._running_id = None
                worker.send(("cancel", request_id))
                self._spawn(self._drain(worker, request_id))
            release()

    async def _stream(self, worker: _Worker, request_id: int) -> AsyncIterator[TokenChunk | GenerationResult]:
        while True:
            try:
                async with asyncio.timeout(self.hang_timeout_s):  # (cheaper per token than wait_for)
                    message = await worker.messages.get()
            except TimeoutError:
                yield self._crashed(worker, f"the engine reported no progress for {self.hang_timeout_s:g} s "
                                            "(it hung)")
                return
            kind = message[0]
            if kind == "dead":
                yield self._crashed(worker, _crash_reason(worker, message[1]))
                return
            if len(message) < 3 or message[1] != request_id:
                continue  # progress of a load, or the tail of an earlier request
            if kind == "chunk":
                yield message[2]
            elif kind == "done":
                yield message[2]
                return
            elif kind == "rejected":
                raise BadRequest(message[2])

    def _crashed(self, worker: _Worker, reason: str) -> GenerationResult:
        self._begin_restart(worker, reason)
        return GenerationResult(text="", stop_type="error",
                                error=f"{reason}; the model is being loaded again, retry in a moment")

    async def _drain(self, worker: _Worker, request_id: int) -> None:
        """After a cancel, wait for the worker to confirm before the next request may use it."""
        try:
            while True:
                try:
                    message = await asyncio.wait_for(worker.messages.get(), self.cancel_timeout_s)
                except TimeoutError:
                    reason = f"the engine did not stop within {self.cancel_timeout_s:.0f} s"
                    self._begin_restart(worker, reason)
                    return
                if message[0] == "dead":
                    self._begin_restart(worker, _crash_reason(worker, message[1]))
                    return
                if message[0] in ("done", "rejected") and message[1] == request_id:
                    return
        finally:
            self._turns.release()

    # ---- tokens --------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        vocab = self._vocab
        if vocab is None:
            raise EngineError("no model is loaded: load one first")
        return vocab.tokenize(text, add_bos)

    def detokenize(self, ids: list[int]) -> str:
        vocab = self._vocab
        if vocab is None:
            raise EngineError("no model is loaded: load one first")
        return vocab.detokenize(ids)

    # ---- lifetime ------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the worker (asking first, then killing) and free the vocabulary."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await self._stop_worker()
        self._set_vocab(None)
        self._state, self._error = "empty", "the engine is closed"
        self._turns.release()  # queued requests wake, find no model and fail one after another

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the engine is closed")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event, data)
        except Exception:  # a listener's bug must not break loading
            log.exception("engine event listener failed on %s", event)
