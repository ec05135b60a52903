"""Keeps the models list current: watches the models dir (sub-folders included) with watchfiles and
announces `models_changed` when a model or a vision projector appears or goes away.

Changes are debounced (a copy writes thousands of times; one announcement follows) and partial files
(`*.incomplete` while downloading, see `library.PARTIAL_SUFFIXES`) are ignored, so a download announces its
model once, when the finished file is moved into place. `GET /bridge/v1/models` scans the folder on every
call, so it is current by itself; the event tells open panels to ask again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import watchfiles

from . import library

log = logging.getLogger(__name__)

DEBOUNCE_MS = 400  # changes closer together than this are announced once
RETRY_S = 5.0  # after the folder vanished or could not be watched

OnChange = Callable[[dict[str, Any]], None]


def _worth_a_look(_change: watchfiles.Change, path: str) -> bool:
    """Partial downloads grow all the time and are never models; hidden files are editors' and tools'."""
    name = Path(path).name
    return not library.is_partial(name) and not name.startswith(".")


def model_ids(root: Path) -> set[str]:
    """The models' ids and the projectors' (listed apart from the models, and a companion's choice)."""
    return {model.id for model in library.scan(root)} | {p.id for p in library.projectors(root)}


def difference(before: set[str], after: set[str]) -> dict[str, Any]:
    """The `models_changed` event's data: the models now, then every id that came or went."""
    models = sorted(i for i in after if not library.is_projector(i))
    projectors = sorted(i for i in after if library.is_projector(i))
    return {"models": models, "projectors": projectors, "added": sorted(after - before),
            "removed": sorted(before - after)}


async def watch_models(root: Path, on_change: OnChange, *, debounce_ms: int = DEBOUNCE_MS) -> None:
    """Call `on_change(difference)` whenever the set of models under `root` (recursively: awatch watches
    sub-folders by default) changes; runs until cancelled."""
    known = await asyncio.to_thread(model_ids, root)
    while True:
        try:
            root.mkdir(parents=True, exist_ok=True)  # downloads put models here: it will exist anyway
            changes = watchfiles.awatch(root, watch_filter=_worth_a_look, debounce=debounce_ms)
            async for _batch in changes:
                known = await _rescan(root, known, on_change)
        except (OSError, RuntimeError) as exc:  # the folder was removed, or the watch limit was hit
            log.warning("watching %s for models failed (%s); trying again in %.0f s", root, exc, RETRY_S)
        await asyncio.sleep(RETRY_S)
        known = await _rescan(root, known, on_change)  # whatever happened while nobody watched


async def _rescan(root: Path, known: set[str], on_change: OnChange) -> set[str]:
    now = await asyncio.to_thread(model_ids, root)
    if now != known:
        change = difference(known, now)
        log.info("models dir changed: added %s, removed %s", change["added"] or "none",
                 change["removed"] or "none")
        on_change(change)
    return now
