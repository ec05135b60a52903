"""The embedding model's child process: llama.cpp's low-level API with `embeddings` on, one batch at a time.

Started by `Embedder` through the engine's worker lifecycle (`bridge.engine.client._Worker`):

    worker -> server   ("ready", info)                     loaded; info as in `EmbeddingRunner.info()`
                       ("load_error", message)             then the process exits
                       ("vectors", request_id, [np.ndarray], n_tokens, truncated)
                       ("rejected", request_id, message)   the request itself is invalid
    server -> worker   ("embed", request_id, [text, ...])  texts already prefixed for their family
                       ("shutdown",)

The vectors are llama.cpp's pooled embeddings (`llama_get_embeddings_seq`) as the model computes them;
normalising is the family's business (`families.py`), done by the server. Each text is its own batch:
pooling is computed per ubatch, so a text must never span two (n_ubatch = n_batch = the context,
shared/tiny-fixtures.md §2); a causal model's KV cache is cleared between texts; and texts packed into one
batch come out up to ~2e-4 away from the same text alone (measured on the BERT fixture: flash attention
rounds through f16 differently), so a message's vector would depend on its neighbours in ST's batch of 10.
One text per decode gives llama.cpp's own vector, whatever else is asked with it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import llama_cpp
import numpy as np

from ..devices.actual import parse_load_log
from ..devices.placement import DevicePlacement, model_params
from ..engine import llama_log
from ..engine.vocab import init_backend, tokenize
from ..engine.worker import LoadFailed, default_threads, serve_loaded
from .families import POOLING_NAMES

POOLING_IDS = {name: number for number, name in POOLING_NAMES.items()}


@dataclass
class EmbeddingSpec:
    """What to load. `pooling` None: the GGUF's own, else `fallback_pooling` (the family's)."""

    model_path: str
    model_id: str
    n_ctx: int = 2048
    n_threads: int | None = None
    fallback_pooling: str = "mean"
    placement: DevicePlacement | None = None  # None: the CPU alone (KoboldCpp's default for embeddings too)
    extra: dict[str, Any] = field(default_factory=dict)


class EmbeddingRunner:
    """A loaded embedding model and its context."""

    def __init__(self, spec: EmbeddingSpec) -> None:
        init_backend()
        llama_log.clear()
        with llama_log.capture() as lines:
            self.model = _load(spec)
            self.ctx = _context(self.model, spec)
        self.allocation = parse_load_log("".join(lines).splitlines())
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.mem = llama_cpp.llama_get_memory(self.ctx)  # NULL for encoders: nothing to clear
        self.causal = bool(self.mem)
        self.pooling = POOLING_NAMES.get(llama_cpp.llama_pooling_type(self.ctx), "none")
        self.end_token = _end_token(self.vocab)

    def info(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "n_embd": self.n_embd, "pooling": self.pooling, "causal": self.causal,
                "pid": os.getpid(), "allocation": self.allocation.to_dict()}

    def close(self) -> None:
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def tokens(self, text: str) -> tuple[list[int], bool]:
        """The text's tokens with the model's special tokens, cut to the context (the end token kept)."""
        ids = tokenize(self.vocab, text.encode("utf-8"), True)
        ids = ids or [max(llama_cpp.llama_vocab_bos(self.vocab), 0)]
        if len(ids) <= self.n_ctx:
            return ids, False
        tail = [ids[-1]] if ids[-1] == self.end_token else []
        return ids[: self.n_ctx - len(tail)] + tail, True

    def embed(self, texts: list[str]) -> tuple[list[np.ndarray], int, int]:
        """(one vector per text in order, tokens evaluated, texts cut to the context)."""
        tokenized = [self.tokens(text) for text in texts]
        vectors = [self._run(ids) for ids, _ in tokenized]
        return vectors, sum(len(ids) for ids, _ in tokenized), sum(cut for _, cut in tokenized)

    def _run(self, tokens: list[int]) -> np.ndarray:
        if self.causal:
            llama_cpp.llama_memory_clear(self.mem, True)
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for pos, token in enumerate(tokens):
                batch.token[pos], batch.pos[pos], batch.n_seq_id[pos] = token, pos, 1
                batch.seq_id[pos][0], batch.logits[pos] = 0, True
            batch.n_tokens = len(tokens)
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                detail = "; ".join(llama_log.recent(2))
                raise RuntimeError(f"llama_decode failed ({rc}){': ' + detail if detail else ''}")
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, 0)
            if not pointer:
                raise RuntimeError("llama.cpp returned no pooled embedding (the model pools nothing)")
            return np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).copy()
        finally:
            llama_cpp.llama_batch_free(batch)


def _end_token(vocab: Any) -> int:
    """The token the tokenizer closes a text with ([SEP] for BERT, EOS where the model adds one), or -1."""
    if llama_cpp.llama_vocab_get_add_eos(vocab):
        return llama_cpp.llama_vocab_eos(vocab)
    return llama_cpp.llama_vocab_sep(vocab)


def _load(spec: EmbeddingSpec) -> Any:
    from ..gguf import model_info, read_file

    params = llama_cpp.llama_model_default_params()
    # Read into memory rather than mapped: the weights then count as this process's own memory, which the
    # planner sees as taken, instead of page cache that looks free to the next plan.
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    try:
        n_layer = model_info(read_file(spec.model_path)).n_layer
    except Exception as exc:
        raise LoadFailed(f"cannot read {os.path.basename(spec.model_path)}: {exc}") from exc
    keep = model_params(params, spec.placement or DevicePlacement(), n_layer)
    model = llama_cpp.llama_model_load_from_file(spec.model_path.encode(), params)
    del keep
    if not model:
        raise LoadFailed(_reason(f"llama.cpp could not load {os.path.basename(spec.model_path)}"))
    return model


def _context(model: Any, spec: EmbeddingSpec) -> Any:
    params = llama_cpp.llama_context_default_params()
    n_train = llama_cpp.llama_model_n_ctx_train(model) or spec.n_ctx
    n_ctx = min(spec.n_ctx, n_train)
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx  # a sequence never spans two ubatches
    params.embeddings = True
    params.n_seq_max = 1
    threads = spec.n_threads or default_threads()
    params.n_threads = params.n_threads_batch = threads
    params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
    ctx = llama_cpp.llama_init_from_model(model, params)
    if ctx and llama_cpp.llama_pooling_type(ctx) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
        llama_cpp.llama_free(ctx)  # the GGUF declares no pooling: the family's
        params.pooling_type = POOLING_IDS.get(spec.fallback_pooling, llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise LoadFailed(_reason(f"llama.cpp could not create a {n_ctx}-token embedding context"))
    return ctx


def _reason(fallback: str) -> str:
    lines = llama_log.recent(3)
    return f"{fallback}: {' / '.join(lines)}" if lines else fallback


# --- the process ---------------------------------------------------------------------------------------


def run(conn: Connection, spec: EmbeddingSpec) -> None:
    """Entry point of the embedding worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve_loaded(conn, lambda: EmbeddingRunner(spec), _serve)


def _serve(conn: Connection, runner: EmbeddingRunner) -> None:
    while True:
        message = conn.recv()
        if message[0] == "shutdown":
            return
        if message[0] != "embed":
            continue
        _, request_id, texts = message
        try:
            vectors, n_tokens, truncated = runner.embed(texts)
        except Exception as exc:  # a failed decode: the request fails, the worker keeps serving
            conn.send(("rejected", request_id, f"the embedding model failed: {exc}"))
            continue
        conn.send(("vectors", request_id, vectors, n_tokens, truncated))

