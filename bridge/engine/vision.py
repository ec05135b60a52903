"""Images in the chat worker: a vision projector (mmproj) loaded by llama.cpp's multimodal library (mtmd,
bound in llama-cpp-python's `mtmd_cpp`) beside the chat model, and prompts whose images are evaluated
where the prompt's media markers stand, before the text that follows them.

`Vision.attach` runs in `Runner.load` when the load spec names a projector; `generate` serves a request
with images: mtmd splits the prompt into text and image chunks, each image chunk is encoded by the
projector and decoded into the KV cache at its positions (`mtmd_helper_eval_chunk_single`), the text
chunks with explicit positions, and generation then goes on as for any prompt (`Runner._sample_loop`).

The KV cache bookkeeping (`Runner.cached`, one entry per position) holds an image as `n_pos` copies of a
negative id derived from the image's sha256: a prompt that repeats the chat and its images reuses them,
a different image differs from the first of its positions on. Those ids never reach a sampler.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llama_cpp
from llama_cpp import mtmd_cpp

from bridge.engine import llama_log
from bridge.engine.reuse import common_prefix
from bridge.engine.sampling import build_chain
from bridge.engine.types import (
    MEDIA_MARKER,
    GenerationRequest,
    GenerationResult,
    ImageInput,
    LoadSpec,
    Timings,
)
from bridge.errors import BadRequest

if TYPE_CHECKING:
    from bridge.engine.worker import Runner

TEXT_CHUNK = mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT


class VisionLoadFailed(Exception):
    """The projector could not be loaded beside this model; the message says why."""


@dataclass
class _Chunk:
    pointer: Any
    text: list[int] | None  # the tokens of a text chunk; None for an image
    n_tokens: int
    n_pos: int
    key: int  # the negative id an image's positions carry in the cache bookkeeping


class Vision:
    """An mtmd context: the projector, bound to the loaded chat model."""

    def __init__(self, ctx: Any, path: str, on_gpu: bool) -> None:
        self.ctx = ctx
        self.path = path
        self.on_gpu = on_gpu

    @classmethod
    def attach(cls, model: Any, spec: LoadSpec, n_threads: int) -> Vision | None:
        """The projector of `spec` loaded beside `model`, or None when the spec names none."""
        if not spec.mmproj_path:
            return None
        _route_logs()
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = spec.mmproj_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.media_marker = MEDIA_MARKER.encode()
        llama_log.clear()
        ctx = mtmd_cpp.mtmd_init_from_file(spec.mmproj_path.encode(), model, params)
        name = os.path.basename(spec.mmproj_path)
        if not ctx:
            detail = " / ".join(llama_log.recent(3))
            raise VisionLoadFailed(f"llama.cpp could not load the projector {name}"
                                   f"{': ' + detail if detail else ''}")
        if not mtmd_cpp.mtmd_support_vision(ctx):
            mtmd_cpp.mtmd_free(ctx)
            raise VisionLoadFailed(f"{name} is not a vision projector (it has no image encoder)")
        return cls(ctx, spec.mmproj_path, spec.mmproj_gpu)

    def info(self) -> dict[str, Any]:
        return {"projector": os.path.basename(self.path), "on_gpu": self.on_gpu,
                "non_causal": bool(mtmd_cpp.mtmd_decode_use_non_causal(self.ctx, None)),
                "mrope": bool(mtmd_cpp.mtmd_decode_use_mrope(self.ctx))}

    def close(self) -> None:
        mtmd_cpp.mtmd_free(self.ctx)

    # --- a request with images ---------------------------------------------------------------------------

    def generate(self, runner: Runner, req: GenerationRequest, emit: Any, cancelled: Any,
                 progress: Any = None) -> GenerationResult:
        if not isinstance(req.prompt, str):
            raise BadRequest("a prompt with images must be text, not token ids")
        if req.n > 1:
            raise BadRequest("several replies to a prompt with images are not supported: ask for one (n = 1)")
        with self._chunks(req) as chunks:
            plan = [entry for chunk in chunks for entry in _entries(chunk)]
            n_tokens = sum(c.n_tokens for c in chunks)
            images = sum(c.n_tokens for c in chunks if c.text is None)
            if len(plan) >= runner.n_ctx:
                raise BadRequest(f"the prompt takes {len(plan)} positions ({images} of them for its "
                                 f"{len(req.images)} image(s)) but the context holds {runner.n_ctx}: shorten "
                                 "it or load the model with a larger context")
            chain = build_chain(req.sampling, vocab=runner.vocab, n_vocab=runner.n_vocab, n_ctx=runner.n_ctx,
                                eog_tokens=runner.eog)
            try:
                t0 = time.perf_counter()
                restored = runner.switch_chat(plan)
                reused = self._load(runner, chunks, plan, cancelled, progress)
                t1 = time.perf_counter()
                chain.accept_history([t for t in plan if t >= 0])
                result = runner._sample_loop(req, chain, emit, cancelled)
                t2 = time.perf_counter()
            finally:
                chain.free()
        result.tokens_evaluated = n_tokens
        result.tokens_cached = reused
        result.cache_restored = restored
        result.timings = Timings(prompt_n=len(plan) - reused, prompt_ms=(t1 - t0) * 1000,
                                 predicted_n=result.tokens_predicted, predicted_ms=(t2 - t1) * 1000)
        return result

    @contextlib.contextmanager
    def _chunks(self, req: GenerationRequest) -> Iterator[list[_Chunk]]:
        """mtmd's chunks of the prompt (text and images), freed after the block."""
        bitmaps = [_bitmap(image) for image in req.images]
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            array = (mtmd_cpp.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
            data = req.prompt.encode("utf-8")  # type: ignore[union-attr]
            text = mtmd_cpp.mtmd_input_text(data, len(data), req.add_bos, True)
            rc = mtmd_cpp.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), array, len(bitmaps))
            if rc != 0:
                raise BadRequest(_tokenize_error(rc, req))
            yield [_chunk(mtmd_cpp.mtmd_input_chunks_get(chunks, i))
                   for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bitmap)

    def _load(self, runner: Runner, chunks: list[_Chunk], plan: list[int], cancelled: Any,
              progress: Any) -> int:
        """Bring the cache to `plan`, evaluating from the first position that differs; returns the reused."""
        prefix = _start(runner, chunks, plan)
        if not llama_cpp.llama_memory_seq_rm(runner.mem, 0, prefix, -1):
            llama_cpp.llama_memory_clear(runner.mem, True)
            prefix = 0
        runner.cached = runner.cached[:prefix]
        pos = 0
        for index, chunk in enumerate(chunks):
            start, pos = pos, pos + chunk.n_pos
            if pos <= prefix:
                continue
            cancelled()
            last = index == len(chunks) - 1
            if chunk.text is None:
                self._eval_image(runner, chunk, start, last)
            else:
                skip = max(prefix - start, 0)
                _decode_at(runner, chunk.text[skip:], start + skip, last)
            runner.cached.extend(plan[max(start, prefix):pos])
            if progress is not None:
                progress(pos - prefix, len(plan) - prefix)
        return prefix

    def _eval_image(self, runner: Runner, chunk: _Chunk, start: int, last: bool) -> None:
        new_past = llama_cpp.llama_pos(0)
        rc = mtmd_cpp.mtmd_helper_eval_chunk_single(self.ctx, runner.ctx, chunk.pointer, start, 0,
                                                   llama_cpp.llama_n_batch(runner.ctx), last,
                                                   ctypes.byref(new_past))
        if rc != 0:
            detail = "; ".join(llama_log.recent(2))
            raise RuntimeError(f"the image could not be evaluated ({rc}){': ' + detail if detail else ''}")


def _route_logs() -> None:
    """mtmd and its helpers log apart from llama.cpp: through the same filter, so errors say why."""
    mtmd_cpp.mtmd_log_set(llama_log.callback(), ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(llama_log.callback(), ctypes.c_void_p(0))


def _bitmap(image: ImageInput) -> Any:
    if len(image.rgb) != image.width * image.height * 3:
        raise BadRequest(f"an image of {image.width}x{image.height} needs {image.width * image.height * 3} "
                         f"bytes of RGB, not {len(image.rgb)}")
    pixels = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
    bitmap = mtmd_cpp.mtmd_bitmap_init(image.width, image.height, pixels)
    if not bitmap:
        raise BadRequest(f"llama.cpp refused an image of {image.width}x{image.height}")
    mtmd_cpp.mtmd_bitmap_set_id(bitmap, image.digest.encode())
    return bitmap


def _chunk(pointer: Any) -> _Chunk:
    n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(pointer)
    n_pos = mtmd_cpp.mtmd_input_chunk_get_n_pos(pointer)
    if mtmd_cpp.mtmd_input_chunk_get_type(pointer) == TEXT_CHUNK:
        count = ctypes.c_size_t(0)
        tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(pointer, ctypes.byref(count))
        return _Chunk(pointer, [tokens[i] for i in range(count.value)], n_tokens, n_pos, 0)
    digest = mtmd_cpp.mtmd_input_chunk_get_id(pointer) or b""
    key = -1 - int.from_bytes(digest[:7].ljust(7, b"\0"), "big") % (1 << 30)
    return _Chunk(pointer, None, n_tokens, n_pos, key)


def _entries(chunk: _Chunk) -> list[int]:
    return chunk.text if chunk.text is not None else [chunk.key] * chunk.n_pos


def _start(runner: Runner, chunks: list[_Chunk], plan: list[int]) -> int:
    """The first position to evaluate: after what the cache shares with `plan`, never inside an image,
    and at least the last chunk's last token (its logits start the reply)."""
    prefix = common_prefix(runner.cached, plan)
    if not runner._window_holds(prefix):
        return 0
    pos = 0
    for chunk in chunks:
        if chunk.text is None and pos < prefix < pos + chunk.n_pos:
            return pos
        pos += chunk.n_pos
    if prefix >= len(plan):
        last_start = len(plan) - chunks[-1].n_pos
        prefix = last_start if chunks[-1].text is None else len(plan) - 1
    return prefix


def _decode_at(runner: Runner, tokens: list[int], start: int, logits_last: bool) -> None:
    """Text tokens at explicit positions (after an image the cache's own count may differ from them),
    in batches of the context's ubatch."""
    step = runner.n_ubatch
    for at in range(0, len(tokens), step):
        part = tokens[at:at + step]
        batch = llama_cpp.llama_batch_init(len(part), 0, 1)
        try:
            for i, token in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = start + at + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = logits_last and at + i == len(tokens) - 1
            batch.n_tokens = len(part)
            rc = llama_cpp.llama_decode(runner.ctx, batch)
        finally:
            llama_cpp.llama_batch_free(batch)
        if rc != 0:
            detail = "; ".join(llama_log.recent(2))
            raise RuntimeError(f"llama_decode failed ({rc}){': ' + detail if detail else ''}")


def _tokenize_error(rc: int, req: GenerationRequest) -> str:
    markers = req.prompt.count(MEDIA_MARKER) if isinstance(req.prompt, str) else 0
    if rc == 1:
        return (f"the prompt has {markers} image marker(s) ({MEDIA_MARKER}) for {len(req.images)} image(s): "
                "each image needs one")
    detail = "; ".join(llama_log.recent(2))
    return f"the projector could not prepare the image ({rc}){': ' + detail if detail else ''}"
