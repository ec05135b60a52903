"""Running one generation for a handler: SSE framing, and stopping at once when the client goes away.

Every dialect drives the engine through `generation()`: it waits for a model, closes the engine's stream
whatever happens (so a disconnect or an error frees the worker for the next request), and watches the
client's connection between tokens, as ST aborts llama.cpp and ooba generations only by closing it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..engine.types import GenerationRequest, GenerationResult, TokenChunk, TokenProb
from ..errors import EngineError
from . import ENGINE_KEY, MANAGER_KEY
from .middleware import cors_headers_for

log = logging.getLogger(__name__)

NO_MODEL_HINT = (
    "no model is loaded: start `st-bridge serve --model <file or id>`, put a GGUF file in the "
    "models folder and POST /bridge/v1/load, or use the bridge panel in SillyTavern"
)


class ClientGone(Exception):
    """The client closed its connection; the generation was stopped."""


def ensure_model(request: web.Request) -> None:
    status = request.app[ENGINE_KEY].status()
    if status.state == "error":
        raise EngineError(f"the model failed to load: {status.error}. {NO_MODEL_HINT}")
    if status.state not in ("ready", "loading"):  # during a load the engine holds requests for the new model
        raise EngineError(NO_MODEL_HINT)


async def generation(
    request: web.Request, req: GenerationRequest
) -> AsyncIterator[TokenChunk | GenerationResult]:
    """The engine's stream for `req`, stopped (and the worker freed) when the client disconnects."""
    ensure_model(request)
    async with aclosing(request.app[ENGINE_KEY].generate(req)) as stream:
        async for item in stream:
            if _client_gone(request):
                log.info("client went away; stopping its generation")
                raise ClientGone()
            if isinstance(item, GenerationResult) and MANAGER_KEY in request.app:
                request.app[MANAGER_KEY].speed.observe(item)  # measured beside predicted speed (status)
            yield item


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@dataclass
class Collected:
    text: str
    result: GenerationResult
    chunks: list[TokenChunk] = field(default_factory=list)

    def replies(self) -> list[tuple[GenerationResult, str, list[TokenChunk]]]:
        """Each reply of an `n` > 1 request (the first alone otherwise): result, text and tokens."""
        out = []
        for result in [self.result, *self.result.swipes]:
            chunks = [c for c in self.chunks if c.index == result.index]
            out.append((result, "".join(c.text for c in chunks), chunks))
        return out


async def collect(request: web.Request, req: GenerationRequest) -> Collected:
    """A whole (non-streamed) generation. A worker failure becomes an EngineError (HTTP 502)."""
    chunks: list[TokenChunk] = []
    result: GenerationResult | None = None
    async for item in generation(request, req):
        if isinstance(item, TokenChunk):
            chunks.append(item)
        else:
            result = item
    if result is None:
        raise EngineError("the generation ended without a result")
    if result.stop_type == "error":
        raise EngineError(f"generation failed: {result.error or 'the engine stopped'}")
    return Collected("".join(c.text for c in chunks if c.index == 0), result, chunks)


# --- server-sent events ------------------------------------------------------------------------------


async def sse_open(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **cors_headers_for(request),
        }
    )
    await response.prepare(request)
    return response


async def sse_send(
    response: web.StreamResponse, data: dict[str, Any] | str, event: str | None = None
) -> None:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    await response.write(f"{head}data: {payload}\n\n".encode())


async def first_item(stream: AsyncIterator[Any]) -> Any:
    """Wait for the first item before opening an SSE response, so queue-full and load errors keep their
    status codes (503, 502) instead of arriving inside a 200 stream."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


def logprob_entries(chunk: TokenChunk) -> list[TokenProb]:
    return chunk.top or (
        [TokenProb(chunk.text, chunk.token_id or 0, chunk.logprob)] if chunk.logprob is not None else []
    )
