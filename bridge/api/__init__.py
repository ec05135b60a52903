"""The HTTP side of the bridge: the app factory (`app.py`), its middlewares and one module per dialect.

The typed keys of the objects every handler shares live here, in the package's leaf, so the dialect
modules and the factory can import them without importing each other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from ..config import Settings
from ..engine.types import EngineStatus, GenerationRequest, GenerationResult, LoadSpec, TokenChunk
from ..events import EventBus
from ..reach import Reach

if TYPE_CHECKING:
    from .manage import ModelManager

class EngineLike(Protocol):
    """What the HTTP layer needs from `bridge.engine.client.Engine` (see its docstrings)."""

    async def load(self, spec: LoadSpec) -> EngineStatus: ...
    async def unload(self) -> None: ...
    def status(self) -> EngineStatus: ...
    def generate(self, req: GenerationRequest) -> AsyncIterator[TokenChunk | GenerationResult]: ...
    async def abort(self) -> bool: ...
    def tokenize(self, text: str, add_bos: bool = False) -> list[int]: ...
    def detokenize(self, ids: list[int]) -> str: ...
    async def close(self) -> None: ...


SETTINGS_KEY = web.AppKey("settings", Settings)
ENGINE_KEY = web.AppKey("engine", EngineLike)
BUS_KEY = web.AppKey("bus", EventBus)
MANAGER_KEY: web.AppKey[ModelManager] = web.AppKey("manager")
REACH_KEY = web.AppKey("reach", Reach)
