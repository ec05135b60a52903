"""llama.cpp server routes: `/completion`, `/tokenize`, `/detokenize`, `/props`, `/health`, `/slots`."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from ..engine.types import GenerationRequest, GenerationResult, TokenChunk
from ..errors import BadRequest, Busy, EngineError
from . import ENGINE_KEY, MANAGER_KEY
from .schemas import DetokenizeBody, LlamaCompletionBody, TokenizeBody
from .streaming import ClientGone, collect, first_item, generation, logprob_entries, sse_open, sse_send
from .translate import HONOURED, parse, to_request

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    status = request.app[ENGINE_KEY].status()
    if status.state == "ready":
        return web.json_response({"status": "ok"})
    if status.state == "loading":
        raise Busy("Loading model", retry_after_s=2)
    raise EngineError(request.app[MANAGER_KEY].hint() or "the engine is not ready")


@routes.get("/props")
async def props(request: web.Request) -> web.Response:
    status = request.app[ENGINE_KEY].status()
    return web.json_response(
        {
            "chat_template": status.chat_template or "",
            "total_slots": 1,
            "model_path": request.app[MANAGER_KEY].model_name(),
            "default_generation_settings": {
                "n_ctx": status.n_ctx,
                "model": request.app[MANAGER_KEY].model_name(),
            },
            "build_info": "st-bridge",
            "samplers": HONOURED,
        }
    )


@routes.get("/slots")
async def slots(request: web.Request) -> web.Response:
    # One slot: the bridge runs one generation at a time (the others wait in its queue).
    status = request.app[ENGINE_KEY].status()
    model = request.app[MANAGER_KEY].model_name()
    return web.json_response(
        [{"id": 0, "n_ctx": status.n_ctx, "n_waiting": status.queue_length, "model": model}]
    )


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    body = parse(TokenizeBody, await request.json())
    engine = request.app[ENGINE_KEY]
    ids = engine.tokenize(body.text, body.add_special)
    if body.with_pieces:
        return web.json_response({"tokens": [{"id": i, "piece": engine.detokenize([i])} for i in ids]})
    return web.json_response({"tokens": ids})


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    body = parse(DetokenizeBody, await request.json())
    return web.json_response({"content": request.app[ENGINE_KEY].detokenize(body.tokens)})


@routes.post("/completion")
@routes.post("/completions")
async def completion(request: web.Request) -> web.StreamResponse:
    raw = await request.json()
    body = parse(LlamaCompletionBody, raw)
    engine = request.app[ENGINE_KEY]
    req = to_request(
        body,
        _prompt(body.prompt, engine.tokenize),
        n_ctx=engine.status().n_ctx,
        tokenize=engine.tokenize,
        raw=raw,
    )
    model = request.app[MANAGER_KEY].model_name()
    if not req.stream:
        done = await collect(request, req)
        served_by = done.result.model_id or model
        replies = [final(result, served_by, text=text) | _probs(chunks, req)
                   for result, text, chunks in done.replies()]
        # Several replies (`n`): an array, as llama-server answers and ST reads it (swipes 1..n-1).
        return web.json_response(replies if req.n > 1 else replies[0])
    return await _stream(request, req, model)


def _prompt(prompt: Any, tokenize: Any) -> str | list[int]:
    """llama.cpp accepts a string, token ids, or a mix of strings and ids."""
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return prompt
    if not all(isinstance(p, str | int) for p in prompt):
        raise BadRequest("`prompt` must be a string or an array of strings and token ids")
    ids: list[int] = []
    for part in prompt:
        ids += [part] if isinstance(part, int) else tokenize(part)
    return ids


async def _stream(request: web.Request, req: GenerationRequest, model: str) -> web.StreamResponse:
    stream = generation(request, req)
    item = await first_item(stream)
    response = await sse_open(request)
    try:
        while item is not None:
            if isinstance(item, GenerationResult):
                for swipe in item.swipes:  # every reply ends with its own stop chunk, the first one last
                    await sse_send(response, final(swipe, item.model_id or model))
            await sse_send(response, _event(item, model, req))
            item = await anext(stream, None)
    except (ClientGone, ConnectionResetError):
        pass
    finally:
        await stream.aclose()
    return response


def _event(item: TokenChunk | GenerationResult, model: str, req: GenerationRequest) -> dict[str, Any]:
    if isinstance(item, TokenChunk):
        # `index` > 0: a chunk of swipe `index` (ST appends it to that swipe, llama-server's own format).
        data = {"content": item.text, "stop": False, "id_slot": 0, "multimodal": False, "index": item.index}
        return data | (_probs([item], req) if item.index == 0 else {})
    if item.stop_type == "error":
        return {"error": {"code": 500, "message": f"generation failed: {item.error}", "type": "server_error"}}
    return final(item, item.model_id or model)


def final(result: GenerationResult, model: str, text: str = "") -> dict[str, Any]:
    return {
        "content": text,
        "stop": True,
        "id_slot": 0,
        "index": result.index,
        "model": model,
        "tokens_predicted": result.tokens_predicted,
        "tokens_evaluated": result.tokens_evaluated,
        "tokens_cached": result.tokens_cached,
        "stop_type": result.stop_type,
        "stopping_word": result.stopping_word,
        "truncated": False,
        "timings": {
            "prompt_n": result.timings.prompt_n,
            "prompt_ms": result.timings.prompt_ms,
            "prompt_per_second": result.timings.prompt_per_second,
            "predicted_n": result.timings.predicted_n,
            "predicted_ms": result.timings.predicted_ms,
            "predicted_per_second": result.timings.predicted_per_second,
        },
    }


def _probs(chunks: list[TokenChunk], req: GenerationRequest) -> dict[str, Any]:
    """`completion_probabilities` in both llama.cpp formats: ST 1.12 reads `probs[{tok_str, prob}]`,
    newer ST and llama.cpp read `top_logprobs[{token, logprob}]`."""
    if not req.sampling.n_probs:
        return {}
    items = []
    for chunk in chunks:
        top = logprob_entries(chunk)
        items.append(
            {
                "content": chunk.text,
                "id": chunk.token_id,
                "token": chunk.text,
                "logprob": chunk.logprob,
                "probs": [{"tok_str": p.token, "prob": math.exp(p.logprob)} for p in top],
                "top_logprobs": [{"id": p.token_id, "token": p.token, "logprob": p.logprob} for p in top],
            }
        )
    return {"completion_probabilities": items}
