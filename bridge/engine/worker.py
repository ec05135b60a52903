"""The engine's child process: llama.cpp through its low-level API, one request at a time.

The server starts `run(conn, spec)` in a spawned process and talks to it over a duplex pipe.

    worker -> server   ("progress", fraction)            while loading
                       ("ready", info dict)              loaded; info as in `Runner.info()`
                       ("load_error", message)           then the process exits
                       ("prompt", request_id, done, total) after each batch of prompt tokens
                       ("chunk", request_id, TokenChunk) one per generated token
                       ("done", request_id, GenerationResult)
                       ("rejected", request_id, message) the request itself is invalid (nothing generated)
    server -> worker   ("generate", request_id, GenerationRequest)
                       ("cancel", request_id)            checked between tokens and prompt batches
                       ("shutdown",)

Generation is `llama_decode` plus llama.cpp's native sampler chain; only each new token becomes text
(`llama_token_to_piece`), so the cost per token does not grow with the reply. The KV cache stays between
requests and a new prompt evaluates only what the cache lacks (`reuse.py`); between requests the reply is
re-spelled as the tokenizer would spell it (`Runner.settle`). A prompt from another chat first saves the
cached conversation's state and restores the saved one that serves it best (`chat_memory.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import llama_cpp
import numpy as np

from bridge.devices.actual import Allocation, parse_load_log, rpc_buffer_aliases
from bridge.devices.ggml import RPCUnavailable, devices_without_memory
from bridge.devices.placement import model_params
from bridge.engine import llama_log, swipes, threadpool
from bridge.engine.chat_memory import MIB, MIN_WORTH, ChatMemory, leaves
from bridge.engine.progress import DECODE_ABORTED, ComputeWatch
from bridge.engine.reuse import common_prefix, plan_reuse
from bridge.engine.sampling import Chain, build_chain
from bridge.engine.stops import StopScanner
from bridge.engine.types import GenerationRequest, GenerationResult, LoadSpec, Timings, TokenChunk, TokenProb
from bridge.engine.vision import Vision, VisionLoadFailed
from bridge.engine.vocab import init_backend, token_piece, tokenize
from bridge.errors import BadRequest

KV_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}
FLASH_ATTN = {
    None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
DEFAULT_CTX = 4096
# Tokens per batch when settling the cache between requests: small, so a new request waits little.
SETTLE_BATCH = 64
# Settling is background work: it re-spells at most this many tokens at the end of the text (a trained
# model's reply rarely differs from the tokenizer's spelling; where one differs early, the next prompt
# evaluates the rest, as it would without settling), on one thread, so that the user's other programs and
# the next request keep the other cores.
SETTLE_MAX_TOKENS = 128
SETTLE_THREADS = 1


class LoadFailed(Exception):
    """The model or its context could not be created; the message says why."""


class Cancelled(Exception):
    """The server asked to stop this request (or to shut down)."""


def default_threads() -> int:
    """Physical cores, as llama-server picks: hyper-threads slow token generation down."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


@dataclass
class Runner:
    """A loaded model and context, and the tokens its KV cache holds (sequence 0, positions 0..n-1)."""

    spec: LoadSpec
    model: llama_cpp.llama_model_p
    ctx: llama_cpp.llama_context_p
    n_gpu_layers: int
    cached: list[int] = field(default_factory=list)
    allocation: Allocation = field(default_factory=Allocation)  # what llama.cpp allocated, per device
    vision: Vision | None = None  # the projector, when the spec names one (vision.py)
    pools: threadpool.ThreadPools | None = None  # its CPU threads, kept between graphs (threadpool.py)

    def __post_init__(self) -> None:
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_ubatch = llama_cpp.llama_n_ubatch(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.can_shift = bool(llama_cpp.llama_memory_can_shift(self.mem))
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.model))
        self.eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        self._one = (llama_cpp.llama_token * 1)()
        self._piece_buf = ctypes.create_string_buffer(256)
        self.memory = ChatMemory(self.spec.chat_memory_mib * MIB, self.spec.chat_memory_disk_mib * MIB,
                                 self.spec.chat_memory_dir)
        # A shift moves positions at once but re-rotates the keys only at the next decode, and a saved
        # state holds positions, not pending rotations: no saving in between.
        self._shift_pending = False
        self.watch = ComputeWatch(self.ctx)  # heartbeats and cancels inside long batches (progress.py)

    # ---- loading -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: LoadSpec, on_progress: Any = None) -> Runner:
        init_backend()
        llama_log.clear()
        with llama_log.capture() as log_pieces:
            model = _load_model(spec, on_progress)
            try:
                ctx = _new_context(model, spec)
            except LoadFailed:
                llama_cpp.llama_model_free(model)
                raise
        layers = _gpu_layers(spec)
        if layers < 0:  # "all": every block plus the output layer, as the planner counts them
            layers = llama_cpp.llama_model_n_layer(model) + 1
        runner = cls(spec=spec, model=model, ctx=ctx, n_gpu_layers=layers)
        runner.pools = threadpool.attach(ctx, llama_cpp.llama_n_threads(ctx),
                                         llama_cpp.llama_n_threads_batch(ctx))
        aliases = rpc_buffer_aliases(devices_without_memory()) if spec.placement else {}
        runner.allocation = parse_load_log("".join(log_pieces).splitlines(), aliases)
        try:
            runner.vision = Vision.attach(model, spec, llama_cpp.llama_n_threads(ctx))
        except VisionLoadFailed as exc:
            runner.close()
            raise LoadFailed(str(exc)) from exc
        runner.warm_up()
        return runner

    def warm_up(self) -> None:
        """A two-token decode (as llama-server does) so the first request pays no lazy initialisation."""
        bos, eos = llama_cpp.llama_vocab_bos(self.vocab), llama_cpp.llama_vocab_eos(self.vocab)
        self._decode([max(bos, 0), max(eos, 0)])
        llama_cpp.llama_memory_clear(self.mem, True)
        self.cached = []

    def info(self) -> dict[str, Any]:
        template = llama_cpp.llama_model_chat_template(self.model, None)
        return {
            "n_ctx": self.n_ctx,
            "n_ctx_train": llama_cpp.llama_model_n_ctx_train(self.model),
            "n_vocab": self.n_vocab,
            "n_gpu_layers": self.n_gpu_layers,
            "kv_type": self.spec.kv_type or "f16",
            "flash_attn": bool(self.spec.flash_attn),
            "chat_template": template.decode("utf-8", errors="replace") if template else "",
            "can_shift": self.can_shift,
            "pid": os.getpid(),
            "allocation": self.allocation.to_dict(),
            "vision": self.vision.info() if self.vision else {},
        }

    def close(self) -> None:
        self.memory.close()
        if self.vision is not None:
            self.vision.close()
        llama_cpp.llama_free(self.ctx)
        if self.pools is not None:  # after the context: it computes on them until it is freed
            self.pools.free()
        llama_cpp.llama_model_free(self.model)

    # ---- prompt --------------------------------------------------------------------------------------

    def prompt_tokens(self, req: GenerationRequest) -> list[int]:
        if isinstance(req.prompt, list):
            tokens = [int(t) for t in req.prompt]
            bad = [t for t in tokens if not 0 <= t < self.n_vocab]
            if bad:
                raise BadRequest(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                 f"(0..{self.n_vocab - 1})")
        else:
            tokens = self.tokenize_text(req.prompt, req.add_bos)
        if not tokens:
            tokens = [max(llama_cpp.llama_vocab_bos(self.vocab), 0)]
        if len(tokens) >= self.n_ctx:
            raise BadRequest(
                f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}: "
                "shorten the chat or load the model with a larger context"
            )
        return tokens

    def load_prompt(self, tokens: list[int], cancelled: Any, progress: Any = None) -> int:
        """Bring the cache to `tokens` evaluating as little as possible; returns the tokens reused.

        `progress(done, total)` is called after each batch: a long prompt on a slow machine takes minutes,
        and the server must be able to tell that from a hang."""
        plan = plan_reuse(self.cached, tokens, can_shift=self.can_shift)
        ok = True
        if plan.shifted:
            start, end = plan.prefix, plan.prefix + plan.dropped
            ok = llama_cpp.llama_memory_seq_rm(self.mem, 0, start, end)
            if ok:
                llama_cpp.llama_memory_seq_add(self.mem, 0, end, -1, -plan.dropped)
                self._shift_pending = True
                self.cached = self.cached[:start] + self.cached[end:end + plan.shifted]
        else:
            ok = self._window_holds(plan.prefix)
            self.cached = self.cached[:plan.prefix]
        ok = ok and llama_cpp.llama_memory_seq_rm(self.mem, 0, len(self.cached), -1)
        if not ok:  # this memory cannot drop a partial range: start over
            llama_cpp.llama_memory_clear(self.mem, True)
            self.cached = []
        reused = len(self.cached)
        rest = tokens[reused:]
        for at in range(0, len(rest), self.n_ubatch):
            cancelled()
            chunk = rest[at:at + self.n_ubatch]
            with self.watch.watching(stop=_asks_to_stop(cancelled), beat=_still_at(progress, at, len(rest))):
                self._decode(chunk)
            self.cached.extend(chunk)
            if progress is not None:
                progress(at + len(chunk), len(rest))
        return reused

    def _window_holds(self, prefix: int) -> bool:
        """Whether a sliding-window cache still holds what continuing after `prefix` attends to.

        The window cache keeps only the last window of positions (plus a ubatch), as llama-server does
        and as the planner sizes it: going back further than that needs the whole prompt again."""
        if not self.n_swa or prefix >= len(self.cached):
            return True
        return llama_cpp.llama_memory_seq_pos_min(self.mem, 0) <= max(prefix - self.n_swa, 0)

    def settle(self, text: str, add_bos: bool, idle: Any) -> None:
        """While the user reads and types: make the cache hold `text` (prompt + reply) as the tokenizer
        will spell it in the next prompt.

        A model does not always generate the tokens the tokenizer would choose for the same text (random
        weights almost never do; trained models now and then), and the next prompt, which carries the reply
        as text, would then differ from the cache from there on. Evaluating that tail now, in small
        batches that stop as soon as a request arrives (`idle()` turns false), takes it off the next
        turn's time to first token.
        """
        # A chat at the edge of the context: settle what fits; the next prompt drops old messages anyway
        # and the shift finds the settled part.
        tokens = self.tokenize_text(text, add_bos)[: self.n_ctx - 1]
        keep = common_prefix(self.cached, tokens)
        if keep == len(tokens) or len(tokens) - keep > SETTLE_MAX_TOKENS or not idle():
            return
        llama_cpp.llama_memory_seq_rm(self.mem, 0, keep, -1)
        self.cached = self.cached[:keep]
        with self._threads(SETTLE_THREADS):
            for at in range(keep, len(tokens), SETTLE_BATCH):
                if not idle():
                    return
                chunk = tokens[at:at + SETTLE_BATCH]
                try:
                    with self.watch.watching(stop=lambda: not idle()):
                        self._decode(chunk)
                except Cancelled:
                    return  # a request arrived mid-batch: it goes first
                self.cached.extend(chunk)

    @contextlib.contextmanager
    def _threads(self, n: int) -> Iterator[None]:
        """Compute on at most `n` threads inside the block (the context's own counts come back after)."""
        own = llama_cpp.llama_n_threads(self.ctx), llama_cpp.llama_n_threads_batch(self.ctx)
        llama_cpp.llama_set_n_threads(self.ctx, min(n, own[0]), min(n, own[1]))
        try:
            yield
        finally:
            llama_cpp.llama_set_n_threads(self.ctx, *own)

    # ---- per-chat memory ---------------------------------------------------------------------------

    def switch_chat(self, tokens: list[int]) -> bool:
        """Before `load_prompt`: save the cached conversation when the prompt leaves it, and restore the
        saved one that serves the prompt better than the cache does. True when one was restored."""
        if not self.memory.enabled:
            return False
        plan = plan_reuse(self.cached, tokens, can_shift=self.can_shift)
        match = self.memory.best(tokens, can_shift=self.can_shift, better_than=plan.reused + MIN_WORTH)
        # Out of the store before the cache goes in, so that saving the cache never evicts the match.
        saved = self.memory.take(match.key) if match is not None else None
        # A match serves MIN_WORTH more tokens than the cache, so the prompt has that many new ones: the
        # cache is saved whenever it has an end of its own to lose.
        if leaves(plan, len(self.cached), len(tokens)):
            self._save_chat()
        return match is not None and self._restore_chat(saved)

    def _save_chat(self) -> None:
        if self._shift_pending or len(self.cached) < MIN_WORTH:
            return
        size = llama_cpp.llama_state_seq_get_size(self.ctx, 0)
        if not self.memory.fits(size):
            return
        data = bytearray(size)
        written = llama_cpp.llama_state_seq_get_data(self.ctx, _bytes(data), size, 0)
        if written:
            self.memory.put(self.cached, data if written == size else data[:written])

    def _restore_chat(self, saved: tuple[list[int], bytearray] | None) -> bool:
        llama_cpp.llama_memory_seq_rm(self.mem, 0, -1, -1)
        self.cached = []
        if saved is None:
            return False
        tokens, data = saved
        read = llama_cpp.llama_state_seq_set_data(self.ctx, _bytes(data), len(data), 0)
        if not read or llama_cpp.llama_memory_seq_pos_max(self.mem, 0) != len(tokens) - 1:
            llama_cpp.llama_memory_clear(self.mem, True)  # refused or half read: start over
            return False
        self.cached = tokens
        return True

    def tokenize_text(self, text: str, add_bos: bool) -> list[int]:
        return tokenize(self.vocab, text.encode("utf-8"), add_bos)

    # ---- generation ----------------------------------------------------------------------------------

    def generate(self, req: GenerationRequest, emit: Any, cancelled: Any,
                 progress: Any = None) -> GenerationResult:
        if req.images:  # evaluated where their markers stand, by the projector (vision.py)
            if self.vision is None:
                raise BadRequest("the loaded model has no vision projector (mmproj), so it cannot see images")
            return self.vision.generate(self, req, emit, cancelled, progress)
        tokens = self.prompt_tokens(req)
        if req.n > 1:  # several replies from one evaluation of the prompt
            return swipes.run(self, req, tokens, emit, cancelled, progress)
        chain = build_chain(req.sampling, vocab=self.vocab, n_vocab=self.n_vocab, n_ctx=self.n_ctx,
                            eog_tokens=self.eog)
        try:
            t0 = time.perf_counter()
            restored = self.switch_chat(tokens)
            reused = self.load_prompt(tokens, cancelled, progress)
            t1 = time.perf_counter()
            chain.accept_history(tokens)
            result = self._sample_loop(req, chain, emit, cancelled)
            t2 = time.perf_counter()
        finally:
            chain.free()
        result.tokens_evaluated = len(tokens)
        result.tokens_cached = reused
        result.cache_restored = restored
        result.timings = Timings(prompt_n=len(tokens) - reused, prompt_ms=(t1 - t0) * 1000,
                                 predicted_n=result.tokens_predicted, predicted_ms=(t2 - t1) * 1000)
        return result

    def _sample_loop(self, req: GenerationRequest, chain: Chain, emit: Any,
                     cancelled: Any) -> GenerationResult:
        scanner = StopScanner(list(req.stop))
        min_tokens, n_probs = req.sampling.min_tokens, req.sampling.n_probs
        stop_type, n = "limit", 0
        try:
            while n < req.max_tokens:
                if n < min_tokens:
                    self._ban_eog()
                top = self._top_probs(n_probs) if n_probs > 0 else None
                token = llama_cpp.llama_sampler_sample(chain.sampler, self.ctx, -1)
                if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                    stop_type = "eos"
                    break
                n += 1
                text = scanner.feed(token_piece(self.vocab, token, self._piece_buf))
                logprob, candidates = self._pick_probs(top, token)
                emit(TokenChunk(text=text, token_id=token, logprob=logprob, top=candidates))
                if scanner.stopped_by:
                    stop_type = "word"
                    break
                if n >= req.max_tokens or len(self.cached) >= self.n_ctx:
                    break  # the last token needs no decode (nothing reads its logits), or the context is full
                self._decode([token])
                self.cached.append(token)
                cancelled()
        except Cancelled:
            stop_type = "abort"  # what was shown stays the answer; held-back text is dropped
        else:
            tail = scanner.finish()
            if tail:
                emit(TokenChunk(text=tail))
        return GenerationResult(text=scanner.result, stop_type=stop_type,  # type: ignore[arg-type]
                                stopping_word=scanner.stopped_by, tokens_predicted=n)

    def _pick_probs(self, top: tuple[np.ndarray, np.ndarray] | None,
                    token: int) -> tuple[float | None, list[TokenProb]]:
        if top is None:
            return None, []
        logprobs, best = top
        return float(logprobs[token]), [
            TokenProb(token=token_piece(self.vocab, int(t)).decode("utf-8", errors="replace"),
                      token_id=int(t), logprob=float(logprobs[t]))
            for t in best
        ]

    def _ban_eog(self) -> None:
        """min_tokens: end-of-generation tokens cannot be picked yet."""
        logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        for token in self.eog:
            logits[token] = -math.inf

    def _top_probs(self, n_probs: int) -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities of the whole vocabulary (from the raw logits) and the best `n_probs` ids."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        k = min(n_probs, self.n_vocab)
        best = np.argpartition(-logprobs, k - 1)[:k]
        best = best[np.argsort(-logprobs[best])]
        return logprobs, best

    def _decode(self, tokens: list[int]) -> None:
        if len(tokens) == 1:
            self._one[0] = tokens[0]
            array = self._one
        else:
            array = (llama_cpp.llama_token * len(tokens))(*tokens)
        rc = llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(array, len(tokens)))
        self._shift_pending = False
        if rc == DECODE_ABORTED and self.watch.aborted:
            raise Cancelled  # llama.cpp dropped this batch's cache entries; `cached` never had them
        if rc != 0:
            detail = "; ".join(llama_log.recent(2))
            raise RuntimeError(f"llama_decode failed ({rc}){': ' + detail if detail else ''}")


def _asks_to_stop(cancelled: Any) -> Any:
    """`cancelled()` (which raises Cancelled) as the yes/no question the abort callback asks."""
    def stop() -> bool:
        try:
            cancelled()
        except Cancelled:
            return True
        return False

    return stop


def _still_at(progress: Any, done: int, total: int) -> Any:
    """A heartbeat from inside a batch: the prompt is still at `done` of `total`, and computing."""
    return None if progress is None else (lambda: progress(done, total))


def _bytes(data: bytearray) -> ctypes.Array[ctypes.c_uint8]:
    """A bytearray as the uint8 buffer llama.cpp reads or writes, without a copy."""
    return (ctypes.c_uint8 * len(data)).from_buffer(data)


def _gpu_layers(spec: LoadSpec) -> int:
    if spec.placement is not None:
        return spec.placement.n_gpu_layers
    if spec.n_gpu_layers is not None:
        return spec.n_gpu_layers
    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


def _load_model(spec: LoadSpec, on_progress: Any) -> llama_cpp.llama_model_p:
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = _gpu_layers(spec)
    if not spec.use_mmap:
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    keep_alive: list[Any] = []
    if spec.placement is not None:
        try:
            keep_alive = model_params(params, spec.placement, _block_count(spec.model_path))
        except (LookupError, RPCUnavailable) as exc:
            raise LoadFailed(f"the planned placement cannot be applied: {exc}") from exc
    callback = None
    if on_progress is not None:
        def progress(fraction: float, _user: ctypes.c_void_p) -> bool:
            on_progress(float(fraction))
            return True

        callback = llama_cpp.llama_progress_callback(progress)
        params.progress_callback = callback
    model = llama_cpp.llama_model_load_from_file(spec.model_path.encode(), params)
    del keep_alive  # llama.cpp copied what it needed from the device list and the overrides
    if not model:
        raise LoadFailed(_reason(f"llama.cpp could not load {os.path.basename(spec.model_path)}"))
    return model


def _block_count(path: str) -> int:
    from bridge.gguf import model_info, read_file

    return model_info(read_file(path)).n_layer


def _new_context(model: llama_cpp.llama_model_p, spec: LoadSpec) -> llama_cpp.llama_context_p:
    params = llama_cpp.llama_context_default_params()
    n_train = llama_cpp.llama_model_n_ctx_train(model)
    params.n_ctx = spec.n_ctx or min(DEFAULT_CTX, n_train or DEFAULT_CTX)
    params.n_batch = spec.n_batch
    params.n_ubatch = min(spec.n_ubatch, spec.n_batch)
    threads = spec.n_threads or default_threads()
    params.n_threads = threads
    params.n_threads_batch = threads
    kv = (spec.kv_type or "f16").lower()
    if kv not in KV_TYPES:
        raise LoadFailed(f"unknown KV cache type {spec.kv_type!r}: use one of {', '.join(KV_TYPES)}")
    params.type_k = params.type_v = KV_TYPES[kv]
    params.flash_attn_type = FLASH_ATTN[spec.flash_attn]
    # Sliding-window layers keep only their window (llama-server's default, and what the planner
    # sizes): the C API's default is a full-size cache, up to several GB more for Gemma models.
    params.swa_full = False
    # Room for batched swipes (engine/swipes.py): sequences sharing one cache of n_ctx cells.
    params.n_seq_max = swipes.capacity(model)
    params.kv_unified = params.n_seq_max > 1
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise LoadFailed(_reason(f"llama.cpp could not create a {params.n_ctx}-token context "
                                 "(not enough memory, or a KV type that needs flash attention)"))
    return ctx


def _reason(fallback: str) -> str:
    lines = llama_log.recent(3)
    return f"{fallback}: {' / '.join(lines)}" if lines else fallback


# ---------------------------------------------------------------------------------------------------------
# the process


def run(conn: Connection, spec: LoadSpec) -> None:
    """Entry point of the worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it closes us
    progress = _Progress(conn)
    serve_loaded(conn, lambda: Runner.load(spec, on_progress=progress), _serve)


def serve_loaded(conn: Connection, load: Any, serve: Any) -> None:
    """A worker child's protocol with the server, for every kind of model: load, then say "ready" with the
    runner's info (or "load_error" with why), serve until the server goes away, free the model."""
    try:
        runner = load()
    except LoadFailed as exc:
        conn.send(("load_error", str(exc)))
        return
    conn.send(("ready", runner.info()))
    try:
        serve(conn, runner)
    except (EOFError, BrokenPipeError, OSError):
        pass  # the server went away: nothing to report to
    finally:
        runner.close()


class _Progress:
    """Load progress, sent at most every whole percent."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.last = -1.0

    def __call__(self, fraction: float) -> None:
        if fraction >= 1.0 or fraction - self.last >= 0.01:
            self.last = fraction
            self.conn.send(("progress", fraction))


def _serve(conn: Connection, runner: Runner) -> None:
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "shutdown":
            return
        if kind != "generate":
            continue  # a late cancel for a request that already finished
        _, request_id, req = message
        shutdown = _handle(conn, runner, request_id, req)
        if shutdown:
            return


def _handle(conn: Connection, runner: Runner, request_id: int, req: GenerationRequest) -> bool:
    """Run one request; returns True when a shutdown arrived meanwhile."""
    stop = {"shutdown": False}

    def cancelled() -> None:
        while conn.poll():
            message = conn.recv()
            if message[0] == "shutdown":
                stop["shutdown"] = True
                raise Cancelled
            if message[0] == "cancel" and message[1] == request_id:
                raise Cancelled

    def emit(chunk: TokenChunk) -> None:
        conn.send(("chunk", request_id, chunk))

    def progress(done: int, total: int) -> None:
        conn.send(("prompt", request_id, done, total))

    try:
        result = runner.generate(req, emit, cancelled, progress)
    except Cancelled:
        result = GenerationResult(text="", stop_type="abort")
    except BadRequest as exc:
        conn.send(("rejected", request_id, exc.message))
        return False
    except Exception as exc:  # a failed decode (or a bug): report it, keep serving from a clean cache
        runner.cached = []
        llama_cpp.llama_memory_clear(runner.mem, True)
        result = GenerationResult(text="", stop_type="error", error=str(exc))
    conn.send(("done", request_id, result))
    settled = isinstance(req.prompt, str) and not req.images  # an image's positions are no text to re-spell
    if not stop["shutdown"] and result.stop_type in ("eos", "word", "limit") and settled:
        runner.settle(req.prompt + result.text, req.add_bos, idle=lambda: not conn.poll())
    return stop["shutdown"]
