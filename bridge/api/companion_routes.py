"""Embeddings (`/v1/embeddings`, `/api/extra/embeddings`) and the companions' management API
(`/bridge/v1/companions/*`). The work is `bridge.companions`'; these handlers translate.

What SillyTavern sends (shared/st-backend-surface.md §1 (c)):
- Vector Storage, source llama.cpp: `POST /v1/embeddings` `{"input": [text, ...]}` in batches of 10, no
  `model`; it reads `data[]` sorted by `index`, `.embedding`.
- Source KoboldCpp: `POST /api/extra/embeddings` `{"input": [...]}` with no Content-Type (the JSON-body rule
  makes an exception for this path), and it scopes its index by the reply's `model`: the embedding
  model's id, stable while the same model serves.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from .. import library
from ..companions import recommend as companion_recommend
from ..companions.families import Role
from ..companions.manager import Vectors
from ..errors import BadRequest
from . import ENGINE_KEY, MANAGER_KEY, SETTINGS_KEY

routes = web.RouteTableDef()
ROLES: dict[str, Role] = {"query": "query", "search_query": "query", "document": "document",
                          "search_document": "document", "passage": "document"}


# --- embeddings ----------------------------------------------------------------------------------------


@routes.post("/v1/embeddings")
@routes.post("/api/extra/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    texts, role, dimensions, encoding = _embedding_body(body)
    answer = await request.app[MANAGER_KEY].companions.embed(texts, role, dimensions)
    return web.json_response(_embedding_reply(answer, encoding))


def _embedding_body(body: Any) -> tuple[list[str], Role, int | None, str]:
    if not isinstance(body, dict):
        raise BadRequest('send {"input": "text"} or {"input": ["text", ...]}')
    value = body.get("input", body.get("content"))
    texts = [value] if isinstance(value, str) else value
    # An empty list is a question too: ST's KoboldCpp source sends one before every list or query of its
    # index, to learn the model's name (its index's scope), and needs `data: []` with that name.
    if not isinstance(texts, list):
        raise BadRequest('`input` is a text or a list of texts, as in {"input": ["hello"]}')
    if not all(isinstance(t, str) for t in texts):
        raise BadRequest("`input` must hold texts; token ids are not accepted here")
    kind = body.get("input_type") or body.get("task") or "unspecified"
    role = ROLES.get(str(kind).lower(), "unspecified")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
        raise BadRequest("`dimensions` is a whole number")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest('`encoding_format` is "float" or "base64"')
    return texts, role, dimensions, encoding


def _embedding_reply(answer: Vectors, encoding: str) -> dict[str, Any]:
    def encoded(vector: list[float]) -> Any:
        if encoding == "float":
            return vector
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encoded(v)}
                 for i, v in enumerate(answer.vectors)],
        "model": answer.model,
        "usage": {"prompt_tokens": answer.n_tokens, "total_tokens": answer.n_tokens},
        "truncated": answer.truncated,
    }


# --- management ----------------------------------------------------------------------------------------


@routes.get("/bridge/v1/companions")
async def companions_status(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    engine = request.app[ENGINE_KEY].status()
    status = manager.companions.status(engine.vision, engine.model_path)
    local = await asyncio.to_thread(_local_files, request.app)
    return web.json_response(status | local)


def _local_files(app: web.Application) -> dict[str, Any]:
    """The embedding models and projectors in the models folder, each with its plan beside what runs."""
    return companion_recommend.local_companions(app[SETTINGS_KEY], app[MANAGER_KEY].companions)


@routes.post("/bridge/v1/companions/embedding")
async def load_embedding(request: web.Request) -> web.Response:
    body = await request.json()
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        raise BadRequest('name the embedding model: {"model": "<id from GET /bridge/v1/companions>"}')
    library.check_id(model)
    ctx = body.get("ctx")
    if ctx is not None and (not isinstance(ctx, int) or isinstance(ctx, bool) or not 64 <= ctx <= 32768):
        raise BadRequest("`ctx` is a whole number of tokens from 64 to 32768")
    return web.json_response(await request.app[MANAGER_KEY].companions.load_embedding(model, n_ctx=ctx))


@routes.delete("/bridge/v1/companions/embedding")
async def drop_embedding(request: web.Request) -> web.Response:
    return web.json_response(await request.app[MANAGER_KEY].companions.drop_embedding())


@routes.post("/bridge/v1/companions/vision")
async def set_vision(request: web.Request) -> web.Response:
    """`{"projector": "<id>" | "auto" | "off"}` for the loaded chat model, which loads again with it."""
    body = await request.json()
    projector = body.get("projector", "auto") if isinstance(body, dict) else None
    if not isinstance(projector, str) or not projector:
        raise BadRequest('send {"projector": "<id of an mmproj file>"}, {"projector": "auto"} or "off"')
    if projector not in ("auto", "off"):
        library.check_id(projector)
    return web.json_response(await _reload_with(request, projector))


@routes.delete("/bridge/v1/companions/vision")
async def drop_vision(request: web.Request) -> web.Response:
    return web.json_response(await _reload_with(request, "off"))


async def _reload_with(request: web.Request, projector: str) -> dict[str, Any]:
    manager = request.app[MANAGER_KEY]
    status = request.app[ENGINE_KEY].status()
    if status.model_path is None or status.state not in ("ready", "loading"):
        raise BadRequest("no chat model is loaded: load one first; its projector goes with it")
    manager.companions.set_vision(Path(status.model_path), projector)
    return await manager.swap()


@routes.get("/bridge/v1/companions/recommend")
async def recommend_embedding(request: web.Request) -> web.Response:
    result = await asyncio.to_thread(companion_recommend.recommend_embeddings, request.app[SETTINGS_KEY],
                                     request.app[MANAGER_KEY].companions)
    return web.json_response(result)
