"""KoboldCpp's own routes (`/api/*`): token counting, abort, version and context size, and the KoboldAI
native generate API (`/api/v1/generate`, `/api/extra/generate/stream`). ST's koboldcpp type generates
through `/v1/completions` (openai.py); these are what it and KoboldAI Classic call besides."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..companions.images import kobold_prompt
from ..engine.types import GenerationResult, TokenChunk
from . import ENGINE_KEY, MANAGER_KEY
from .schemas import DetokenizeBody, KoboldGenerateBody, TokenizeBody
from .streaming import ClientGone, collect, first_item, generation, sse_open, sse_send
from .translate import HONOURED, IGNORED_WHEN_ACTIVE, parse, to_request

routes = web.RouteTableDef()

KOBOLDCPP_VERSION = "1.80"  # the KoboldCpp release whose API this persona follows
KOBOLDAI_API_VERSION = "1.2.5"


@routes.get("/api/v1/model")
async def model(request: web.Request) -> web.Response:
    name = request.app[MANAGER_KEY].model_name()
    return web.json_response({"result": f"koboldcpp/{name}" if name else "inactive"})


@routes.get("/api/v1/info/version")
async def api_version(request: web.Request) -> web.Response:
    return web.json_response({"result": KOBOLDAI_API_VERSION})


@routes.get("/api/extra/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "result": "KoboldCpp",
            "version": KOBOLDCPP_VERSION,
            "protected": False,
            "txt2img": False,
            "vision": bool(request.app[ENGINE_KEY].status().vision),
            "transcribe": False,
            "multiplayer": False,
            "websearch": False,
            "tts": False,
            "embeddings": request.app[MANAGER_KEY].companions.embedder.state == "ready",
            "bridge": "st-bridge",
            "samplers": {"honoured": HONOURED, "ignored": sorted(IGNORED_WHEN_ACTIVE)},
        }
    )


@routes.get("/api/extra/true_max_context_length")
@routes.get("/api/v1/config/max_context_length")
async def max_context_length(request: web.Request) -> web.Response:
    return web.json_response({"value": request.app[ENGINE_KEY].status().n_ctx})


@routes.get("/api/v1/config/max_length")
async def max_length(request: web.Request) -> web.Response:
    return web.json_response({"value": 256})


@routes.post("/api/extra/tokencount")
@routes.post("/api/extra/tokenize")
async def tokencount(request: web.Request) -> web.Response:
    body = parse(TokenizeBody, await request.json())
    ids = request.app[ENGINE_KEY].tokenize(body.text, body.add_special)
    return web.json_response({"value": len(ids), "ids": ids})


@routes.post("/api/extra/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    body = parse(DetokenizeBody, await request.json())
    return web.json_response({"result": request.app[ENGINE_KEY].detokenize(body.tokens), "success": True})


@routes.post("/api/extra/abort")
async def abort(request: web.Request) -> web.Response:
    # ST 1.12 sends this with no body and no headers when the user presses Stop.
    stopped = await request.app[ENGINE_KEY].abort()
    return web.json_response({"success": "true", "done": "true" if stopped else "false"})


@routes.post("/api/v1/generate")
async def generate(request: web.Request) -> web.Response:
    req = await _request(request, stream=False)
    done = await collect(request, req)
    return web.json_response({"results": [{"text": done.text, "finish_reason": done.result.finish_reason}]})


@routes.post("/api/extra/generate/stream")
async def generate_stream(request: web.Request) -> web.StreamResponse:
    stream = generation(request, await _request(request, stream=True))
    item = await first_item(stream)
    response = await sse_open(request)
    try:
        while item is not None:
            await _send(response, item)
            item = await anext(stream, None)
    except (ClientGone, ConnectionResetError):
        pass
    finally:
        await stream.aclose()
    return response


async def _request(request: web.Request, *, stream: bool) -> Any:
    raw = await request.json()
    body = parse(KoboldGenerateBody, raw)
    body.stream = stream
    body.n = 1  # KoboldAI's native API answers one text (ST asks for swipes only through /completion)
    engine = request.app[ENGINE_KEY]
    prompt, images = kobold_prompt(body.prompt, raw.get("images"))  # KoboldCpp's images: before the prompt
    request.app[MANAGER_KEY].companions.check_images(engine.status(), images)
    req = to_request(body, prompt, n_ctx=engine.status().n_ctx, tokenize=engine.tokenize, raw=raw)
    req.images = images
    return req


async def _send(response: web.StreamResponse, item: TokenChunk | GenerationResult) -> None:
    if isinstance(item, TokenChunk):
        if item.text:
            await sse_send(response, {"token": item.text, "finish_reason": None}, event="message")
    elif item.stop_type == "error":
        await sse_send(response, {"error": {"message": f"generation failed: {item.error}"}}, event="error")
    else:
        await sse_send(response, {"token": "", "finish_reason": item.finish_reason}, event="message")
