"""OpenAI-style routes (`/v1/*`): what ST's koboldcpp and ooba types call, plus text-generation-webui's
`/v1/internal/*` helpers and `/v1/chat/completions` rendered with the model's own chat template."""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from ..companions.images import split_chat
from ..engine.types import GenerationRequest, GenerationResult, TokenChunk, TokenProb
from ..errors import BadRequest
from . import ENGINE_KEY, MANAGER_KEY
from .schemas import ChatCompletionBody, CompletionBody, DetokenizeBody, TokenizeBody
from .streaming import ClientGone, collect, first_item, generation, logprob_entries, sse_open, sse_send
from .translate import parse, to_request

routes = web.RouteTableDef()


# --- model info --------------------------------------------------------------------------------------


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    # ST 1.12 hangs forever unless this answers 2xx with a `data` array, so it never waits and never fails.
    name = request.app[MANAGER_KEY].model_name()
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "st-bridge"}] if name else []
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/internal/model/info")
async def model_info(request: web.Request) -> web.Response:
    name = request.app[MANAGER_KEY].model_name() or "None"
    return web.json_response({"model_name": name, "lora_names": [], "loader": "llama.cpp"})


# --- tokens ------------------------------------------------------------------------------------------


@routes.post("/v1/internal/encode")
async def encode(request: web.Request) -> web.Response:
    body = parse(TokenizeBody, await request.json())
    tokens = request.app[ENGINE_KEY].tokenize(body.text, body.add_special)
    return web.json_response({"tokens": tokens, "length": len(tokens)})


@routes.post("/v1/internal/token-count")
async def token_count(request: web.Request) -> web.Response:
    body = parse(TokenizeBody, await request.json())
    return web.json_response({"length": len(request.app[ENGINE_KEY].tokenize(body.text, body.add_special))})


@routes.post("/v1/internal/decode")
async def decode(request: web.Request) -> web.Response:
    body = parse(DetokenizeBody, await request.json())
    return web.json_response({"text": request.app[ENGINE_KEY].detokenize(body.tokens)})


@routes.post("/v1/internal/stop-generation")
async def stop_generation(request: web.Request) -> web.Response:
    await request.app[ENGINE_KEY].abort()
    return web.json_response("OK")


# --- completions -------------------------------------------------------------------------------------


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    raw = await request.json()
    body = parse(CompletionBody, raw)
    req = _request(request, body, _prompt(body.prompt), raw)
    return await _respond(request, req, _Completion(request.app[MANAGER_KEY].model_name()))


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    raw = await request.json()
    body = parse(ChatCompletionBody, raw)
    # Image parts (ST's Caption extension) become media markers in the text, the images travel beside it.
    messages, images = split_chat([m.model_dump() for m in body.messages])
    request.app[MANAGER_KEY].companions.check_images(request.app[ENGINE_KEY].status(), images)
    prompt, stops = request.app[MANAGER_KEY].render_chat(messages)
    req = _request(request, body, prompt, raw)
    req.stop = list(dict.fromkeys(req.stop + stops))
    req.add_bos = True
    req.images = images
    return await _respond(request, req, _Chat(request.app[MANAGER_KEY].model_name()))


def _prompt(prompt: str | list[Any]) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if all(isinstance(p, int) for p in prompt):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise BadRequest("send one prompt per request: a string, or an array of token ids")


def _request(
    request: web.Request, body: Any, prompt: str | list[int], raw: dict[str, Any]
) -> GenerationRequest:
    engine = request.app[ENGINE_KEY]
    return to_request(
        body,
        prompt,
        n_ctx=engine.status().n_ctx,
        tokenize=engine.tokenize,
        ooba=raw.get("api_type") == "ooba",
        raw=raw,
    )


async def _respond(request: web.Request, req: GenerationRequest, shape: _Completion) -> web.StreamResponse:
    if not req.stream:
        done = await collect(request, req)
        shape.model = done.result.model_id or shape.model
        answer = shape.whole(done.text, done.result, done.chunks, req.sampling.n_probs)
        # `n` > 1: one choice per reply, each with its index (OpenAI's shape; ST reads choices 1.. as swipes).
        answer["choices"] = [shape.whole(text, result, chunks, req.sampling.n_probs)["choices"][0]
                             for result, text, chunks in done.replies()]
        return web.json_response(answer)
    stream = generation(request, req)
    first = await first_item(stream)
    # Its turn has come: the model serving it now is the one to name (a swap may have come in between).
    shape.model = request.app[MANAGER_KEY].model_name() or shape.model
    response = await sse_open(request)
    try:
        for data in shape.opening():
            await sse_send(response, data)
        item = first
        while item is not None:
            await _send_item(response, shape, item, req.sampling.n_probs)
            item = await anext(stream, None)
        await sse_send(response, "[DONE]")
    except (ClientGone, ConnectionResetError):
        pass
    finally:
        await stream.aclose()
    return response


async def _send_item(response: web.StreamResponse, shape: _Completion, item: Any, n_probs: int) -> None:
    if isinstance(item, TokenChunk):
        if item.text or (n_probs and item.token_id is not None):
            await sse_send(response, shape.chunk(item, n_probs))
        return
    for swipe in item.swipes:  # each reply of an `n` > 1 request ends with its own closing chunk
        await sse_send(response, shape.last(swipe))
    if item.stop_type == "error":
        # ST shows `error.message` as a toast and stops reading: exactly what a failed generation needs.
        await sse_send(
            response, {"error": {"message": f"generation failed: {item.error}", "type": "server_error"}}
        )
    else:
        await sse_send(response, shape.last(item))


class _Completion:
    """`text_completion` objects (non-streamed, chunks and the closing chunk)."""

    object = "text_completion"

    def __init__(self, model: str) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.model = model
        self.created = int(time.time())

    def _envelope(self, choice: dict[str, Any], index: int = 0) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, **choice}],
        }

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, chunk: TokenChunk, n_probs: int) -> dict[str, Any]:
        logprobs = openai_logprobs([chunk]) if n_probs else None
        return self._envelope({"text": chunk.text, "finish_reason": None, "logprobs": logprobs}, chunk.index)

    def last(self, result: GenerationResult) -> dict[str, Any]:
        closing = {"text": "", "finish_reason": result.finish_reason, "logprobs": None}
        return self._envelope(closing, result.index) | {"usage": usage(result)}

    def whole(
        self, text: str, result: GenerationResult, chunks: list[TokenChunk], n_probs: int
    ) -> dict[str, Any]:
        logprobs = openai_logprobs(chunks) if n_probs else None
        choice = {"text": text, "finish_reason": result.finish_reason, "logprobs": logprobs}
        return self._envelope(choice, result.index) | {"usage": usage(result)}


class _Chat(_Completion):
    object = "chat.completion.chunk"

    def opening(self) -> list[dict[str, Any]]:
        return [self._envelope({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})]

    def chunk(self, chunk: TokenChunk, n_probs: int) -> dict[str, Any]:
        delta = {"delta": {"content": chunk.text}, "finish_reason": None, "logprobs": None}
        return self._envelope(delta, chunk.index)

    def last(self, result: GenerationResult) -> dict[str, Any]:
        closing = {"delta": {}, "finish_reason": result.finish_reason}
        return self._envelope(closing, result.index) | {"usage": usage(result)}

    def whole(
        self, text: str, result: GenerationResult, chunks: list[TokenChunk], n_probs: int
    ) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        choice = {"message": message, "finish_reason": result.finish_reason, "logprobs": None}
        return self._envelope(choice, result.index) | {"object": "chat.completion", "usage": usage(result)}


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.tokens_evaluated,
        "completion_tokens": result.tokens_predicted,
        "total_tokens": result.tokens_evaluated + result.tokens_predicted,
    }


def _by_text(candidates: list[TokenProb]) -> dict[str, float]:
    """{token text: logprob}, best first; candidates that spell the same text (byte tokens of one
    character) keep the best one's place and value instead of overwriting it with a worse one."""
    out: dict[str, float] = {}
    for candidate in candidates:
        out.setdefault(candidate.token, candidate.logprob)
    return out


def openai_logprobs(chunks: list[TokenChunk]) -> dict[str, Any]:
    """OpenAI's legacy completion logprobs; ST reads `top_logprobs[0]` as {token: logprob}."""
    offsets, offset = [], 0
    for chunk in chunks:
        offsets.append(offset)
        offset += len(chunk.text)
    return {
        "tokens": [c.text for c in chunks],
        "token_logprobs": [c.logprob for c in chunks],
        "top_logprobs": [_by_text(logprob_entries(c)) for c in chunks],
        "text_offset": offsets,
    }
