"""`GET /bridge/v1/models/{id}/prompt-format`: the SillyTavern presets that write a model's own prompts.

For any local model, loaded or not: its GGUF header is read (nothing is loaded) and the presets are derived
from its chat template (bridge/templates); a model without one gets its family's format, marked
`"source": "guess"`, with the model card's format line from the catalog as the first hint.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import catalog, library, recommend
from ..errors import BridgeError
from ..templates.model_format import format_for_file
from . import MANAGER_KEY, SETTINGS_KEY

routes = web.RouteTableDef()


@routes.get("/bridge/v1/models/{id:.+}/prompt-format")
async def prompt_format(request: web.Request) -> web.Response:
    model = library.check_id(request.match_info["id"])
    answer = await asyncio.to_thread(_prompt_format, request.app, model)
    return web.json_response(answer)


def _prompt_format(app: web.Application, model: str) -> dict[str, Any]:
    path = app[MANAGER_KEY].model_file(model)
    fmt = format_for_file(path, model, card_format=_card_format(app, model, path))
    return {"model": model, **fmt.to_dict()}


def _card_format(app: web.Application, model: str, path: Path) -> str | None:
    """The prompt format the model card names, when the model (file `path`) comes from a catalog
    repository."""
    settings = app[SETTINGS_KEY]
    cat = catalog.load(settings.data_dir)
    try:
        repo = recommend.find_repo(cat, settings.models_path, model, path)
    except BridgeError:
        return None
    entry = cat.find(repo) if repo else None
    return entry.prompt_format if entry else None
