"""Exact tokenization in the server process, from the loaded GGUF's vocabulary alone.

ST counts tokens several times per message, sometimes from a request that blocks the browser. Loading the
same file `vocab_only` (no weights: milliseconds, a few MB) gives the very token ids the worker will
evaluate, without ever waiting behind a generation.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import llama_cpp

from bridge.engine import llama_log
from bridge.errors import BadRequest, EngineError

_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    """llama.cpp's one-time global set-up, with its log routed through our filter."""
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        llama_log.install()
        llama_cpp.llama_backend_init()
        _backend_ready = True


class Vocab:
    """A GGUF's tokenizer. Thread-safe: calls are serialised by a lock (each takes microseconds)."""

    def __init__(self, path: str | Path) -> None:
        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        llama_log.clear()
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            reason = "; ".join(llama_log.recent(3)) or "llama.cpp could not read it"
            raise EngineError(f"cannot load {Path(path).name}: {reason}")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._lock = threading.Lock()
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, exactly as the worker evaluates it as a prompt: special tokens written in
        the text (`<|im_start|>`) count as one token, and `add_bos` adds what the model adds."""
        data = text.encode("utf-8")
        with self._lock:
            self._check_open()
            return tokenize(self._vocab, data, add_bos)

    def detokenize(self, ids: list[int]) -> str:
        with self._lock:
            self._check_open()
            bad = [t for t in ids if not 0 <= t < self.n_vocab]
            if bad:
                raise BadRequest(f"token ids {bad[:5]} are outside this vocabulary (0..{self.n_vocab - 1})")
            return detokenize(self._vocab, ids)

    def close(self) -> None:
        with self._lock:
            if self._model:
                llama_cpp.llama_model_free(self._model)
                self._model = None
                self._vocab = None

    def _check_open(self) -> None:
        if not self._model:
            raise EngineError("no model is loaded: load one first")


# ---------------------------------------------------------------------------------------------------------
# helpers shared with the worker (they take a raw llama_vocab pointer)


def tokenize(vocab: llama_cpp.llama_vocab_p, data: bytes, add_bos: bool) -> list[int]:
    """The ids of `data`; with `add_bos`, the BOS when the vocabulary asks for one (`add_bos_token`).

    llama.cpp's own flag (`add_special`) adds a BOS only where the vocabulary asks for one, but also an EOS
    wherever it asks for that, BOS or not: so it is set only for vocabularies that want a BOS. The server's
    token counts and the worker's prompts both come from here."""
    add_special = add_bos and bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    capacity = len(data) + 8
    buf = (llama_cpp.llama_token * capacity)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, True)
    if n < 0:  # more tokens than bytes cannot happen with SPM/BPE, but the API allows it: retry bigger
        capacity = -n
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, True)
    return list(buf[:n])


def detokenize(vocab: llama_cpp.llama_vocab_p, ids: list[int]) -> str:
    if not ids:
        return ""
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    capacity = len(ids) * 16 + 16
    buf = ctypes.create_string_buffer(capacity)
    n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, capacity, False, True)
    if n < 0:
        capacity = -n
        buf = ctypes.create_string_buffer(capacity)
        n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, capacity, False, True)
    return buf.raw[:n].decode("utf-8", errors="replace")


def token_piece(vocab: llama_cpp.llama_vocab_p, token: int, buf: ctypes.Array | None = None) -> bytes:
    """The bytes one token adds to the text (control tokens add nothing)."""
    if buf is None:
        buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[:n]
