"""Workers under `/bridge/v1` (for the ST panel): other machines lending a GPU or CPU through RPC.

    GET    /bridge/v1/workers                the workers and RPC servers, each with its state (ready,
                                             unreachable, refused), devices, round trip and why not ready
    POST   /bridge/v1/workers                {"address": "host:port"}: add a worker (checked at once)
    DELETE /bridge/v1/workers/{address}      forget it (a model running on it keeps running until reloaded)

A change is announced on the event stream as `workers_changed`. The next load (or `POST /bridge/v1/load {}`,
the loaded file again) plans with the workers that are ready. Logic lives in `bridge.workers.registry`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..errors import BadRequest, NotFound
from ..workers.registry import registry
from . import BUS_KEY, MANAGER_KEY

routes = web.RouteTableDef()


def workers_dict(request: web.Request) -> dict[str, Any]:
    placement = ((request.app[MANAGER_KEY].plan or {}).get("placement") or {})
    in_use = set(placement.get("rpc_servers") or [])
    workers = [w | {"in_use": w["address"] in in_use} for w in registry.to_list()]
    return {"workers": workers}


@routes.get("/bridge/v1/workers")
async def list_workers(request: web.Request) -> web.Response:
    return web.json_response(workers_dict(request))


@routes.post("/bridge/v1/workers")
async def add_worker(request: web.Request) -> web.Response:
    body = await request.json()
    address = body.get("address") if isinstance(body, dict) else None
    if not isinstance(address, str) or not address.strip():
        raise BadRequest('send {"address": "host:port"}: the RPC port `st-bridge worker` prints')
    remote = await asyncio.to_thread(registry.add, address.strip())
    request.app[BUS_KEY].publish("workers_changed", workers_dict(request))
    return web.json_response(remote.to_dict(), status=201)


@routes.delete("/bridge/v1/workers/{address}")
async def remove_worker(request: web.Request) -> web.Response:
    address = request.match_info["address"]
    if not registry.remove(address):
        raise NotFound(f"no worker {address}; GET /bridge/v1/workers lists them", address=address)
    request.app[BUS_KEY].publish("workers_changed", workers_dict(request))
    return web.json_response({"removed": address})
