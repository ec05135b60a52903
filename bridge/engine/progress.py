"""Progress from inside llama.cpp's compute, for the worker: heartbeats and cancels in the middle of a batch.

One prompt batch of a big model on a laptop CPU can take minutes, during which `llama_decode` does not
return. llama.cpp's abort callback (`llama_set_abort_callback`) is called by the CPU backend's first thread
after every graph node it computes (ggml-cpu.c, `ggml_graph_compute_thread`), so it is a per-layer (finer:
per-operation) sign of life. `ComputeWatch` installs it around the batches that may run long (prompt
batches and the settling between requests), and from it

* sends a heartbeat at most every HEARTBEAT_S, which the server's watchdog counts as progress: a slow
  machine keeps its request, and only compute that stops advancing looks hung;
* asks `stop()` at most every POLL_S and, when it says so, makes llama.cpp abandon the batch
  (`llama_decode` returns 2 and drops that batch's cache entries), so a cancel lands within a node.

Its cost is one Python call per graph node (277 nodes for a 512-token batch of a 16-layer model): lost in
the noise on the 2-core test machine, both for prompt batches and for single tokens (bench/compute_watch.py).
Token-by-token decoding still runs without it, since each token reports itself. `cb_eval`, the other
per-node hook, was not used: asking for every node makes the scheduler compute the graph node by node.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import llama_cpp

HEARTBEAT_S = 1.0
POLL_S = 0.05
DECODE_ABORTED = 2  # llama_decode's return code when the abort callback stopped it


class ComputeWatch:
    """The abort callback of one llama.cpp context; active only inside `watching()`."""

    def __init__(self, ctx: llama_cpp.llama_context_p) -> None:
        self.ctx = ctx
        self.aborted = False  # the last watched batch was stopped by `stop()`
        self.nodes = 0  # graph nodes computed in the current watched batch
        self._stop: Callable[[], bool] | None = None
        self._beat: Callable[[], None] | None = None
        self._next_poll = 0.0
        self._next_beat = 0.0
        self._callback = llama_cpp.ggml_abort_callback(self._on_node)  # kept alive as long as the watch

    @contextlib.contextmanager
    def watching(self, stop: Callable[[], bool], beat: Callable[[], None] | None = None) -> Iterator[None]:
        """Within this block, every batch `llama_decode` computes reports to `beat` and obeys `stop`."""
        now = time.monotonic()
        self._stop, self._beat, self.aborted, self.nodes = stop, beat, False, 0
        self._next_poll, self._next_beat = now + POLL_S, now + HEARTBEAT_S
        llama_cpp.llama_set_abort_callback(self.ctx, self._callback, None)
        try:
            yield
        finally:
            llama_cpp.llama_set_abort_callback(self.ctx, ggml_no_callback(), None)
            self._stop = self._beat = None

    def _on_node(self, _data: Any) -> bool:
        """Called from inside llama_decode after each node: must be cheap, and must never raise."""
        self.nodes += 1
        now = time.monotonic()
        if now < self._next_poll:
            return False
        self._next_poll = now + POLL_S
        try:
            if self._beat is not None and now >= self._next_beat:
                self._next_beat = now + HEARTBEAT_S
                self._beat()
            if self._stop is not None and self._stop():
                self.aborted = True
        except Exception:  # an exception cannot cross into C: stop the batch, the caller sees `aborted`
            self.aborted = True
        return self.aborted


def ggml_no_callback() -> Any:
    """A null abort callback (llama.cpp then never stops a batch)."""
    return llama_cpp.ggml_abort_callback()
