"""The HTTP edge: errors → status + JSON (one envelope per dialect), CORS, request guards, API key.

Order (outermost first): errors, CORS, body size, API key, guard for mutating management calls. Errors is
outermost so every refusal below it gets the same JSON envelope and the CORS headers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

from aiohttp import web

from ..config import is_loopback
from ..errors import BridgeError, Busy, Forbidden, PayloadTooLarge
from . import SETTINGS_KEY

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MANAGE_PREFIX = "/bridge/"
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
    "Access-Control-Max-Age": "600",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    503: "unavailable_error",
}


# --- error envelope ----------------------------------------------------------------------------------


def dialect_of(path: str) -> str:
    if path.startswith(MANAGE_PREFIX):
        return "bridge"
    if path.startswith("/api/"):
        return "kobold"
    if path.startswith("/v1/"):
        return "openai"
    return "llamacpp"


def error_body(dialect: str, status: int, code: str, message: str, **details: Any) -> dict[str, Any]:
    """The one place error JSON is built; each dialect gets the shape its real server uses."""
    kind = _ERROR_TYPES.get(status, "server_error")
    if dialect == "bridge":
        return {"error": {"code": code, "message": message, "status": status, **details}}
    if dialect == "kobold":  # KoboldCpp answers errors in FastAPI style
        return {
            "detail": {"msg": message, "type": code},
            "error": {"message": message, "type": kind, "code": code, "src": "bridge"},
        }
    if dialect == "llamacpp":
        return {"error": {"code": status, "message": message, "type": kind, "src": "bridge"}}
    return {"error": {"message": message, "type": kind, "code": code, "param": None, "src": "bridge"}}


def error_response(
    request: web.Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    **details: Any,
) -> web.Response:
    body = error_body(dialect_of(request.path), status, code, message, **details)
    # Errors skip the CORS middleware (they unwind past it), yet the panel must read their message.
    return web.json_response(body, status=status, headers=cors_headers_for(request) | (headers or {}))


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Busy as exc:
        return error_response(
            request,
            exc.status,
            exc.code,
            exc.message,
            headers={"Retry-After": str(max(1, int(exc.retry_after_s)))},
        )
    except BridgeError as exc:
        return error_response(request, exc.status, exc.code, exc.message, **_jsonable(exc.details))
    except web.HTTPRequestEntityTooLarge:
        return _too_large(request)
    except json.JSONDecodeError as exc:
        return error_response(request, 400, "bad_json", f"the request body is not valid JSON: {exc}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        message = f"{request.method} {request.path}: {exc.reason}"
        return error_response(request, exc.status, code, message, headers=_allow_header(exc))
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(
            request, 500, "internal_error", "the bridge hit an unexpected error; its log has the details"
        )


def _jsonable(details: dict[str, object]) -> dict[str, Any]:
    return {k: v if isinstance(v, str | int | float | bool | None) else str(v) for k, v in details.items()}


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


def _too_large(request: web.Request) -> web.Response:
    limit = request.app[SETTINGS_KEY].max_body_mb
    return error_response(request, 413, PayloadTooLarge.code, f"the request body is larger than {limit:g} MB")


# --- CORS --------------------------------------------------------------------------------------------


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    allowed = origin is not None and origin in request.app[SETTINGS_KEY].allowed_origins
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if not allowed:
            raise Forbidden(f"origin {origin!r} is not allowed; add it to allowed_origins")
        return web.Response(status=204, headers=_cors_headers(origin, preflight=True))
    response = await handler(request)
    if allowed and not response.prepared:
        response.headers.update(_cors_headers(origin))
    return response


def _cors_headers(origin: str | None, preflight: bool = False) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin or "", "Vary": "Origin"}
    if preflight:
        headers |= CORS_HEADERS | {"Access-Control-Allow-Private-Network": "true"}
    return headers


def cors_headers_for(request: web.Request) -> dict[str, str]:
    """CORS headers for a streamed response (prepared before the CORS middleware sees it)."""
    origin = request.headers.get("Origin")
    return _cors_headers(origin) if origin in request.app[SETTINGS_KEY].allowed_origins else {}


# --- body size, API key, management guard -------------------------------------------------------------


@web.middleware
async def body_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    # aiohttp's client_max_size covers chunked bodies when they are read; this refuses early by header.
    length = request.content_length
    if length is not None and length > request.app[SETTINGS_KEY].max_body_bytes:
        return _too_large(request)
    return await handler(request)


@web.middleware
async def api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[SETTINGS_KEY].api_key
    if key is None or request.method == "OPTIONS":
        return await handler(request)
    sent = request.headers.get("Authorization", "")
    if sent != f"Bearer {key}":
        return error_response(
            request,
            401,
            "unauthorized",
            "this bridge needs an API key: send `Authorization: Bearer <key>` "
            "(in ST, fill in the API key field of the connection)",
        )
    return await handler(request)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Mutating management calls: only JSON, only from allowed origins, only for a Host naming this machine.

    Together these stop a web page in the user's browser from driving the bridge: a cross-origin
    `text/plain` form POST needs no preflight, and DNS rebinding shows up as a foreign Host header.
    """
    if request.method in MUTATING and request.path.startswith(MANAGE_PREFIX):
        check_host(request)
        origin = request.headers.get("Origin")
        if origin is not None and origin not in request.app[SETTINGS_KEY].allowed_origins:
            raise Forbidden(f"origin {origin!r} may not change the bridge; add it to allowed_origins")
        if request.content_type != "application/json":
            raise Forbidden("management calls that change something accept only application/json bodies")
    return await handler(request)


def check_host(request: web.Request) -> None:
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    host = host.strip("[]").lower()
    if host in _own_names() or is_loopback(host) or host == request.app[SETTINGS_KEY].host.lower():
        return
    raise Forbidden(f"Host {request.host!r} does not name this machine")


@cache
def _own_names() -> frozenset[str]:
    names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
    with contextlib.suppress(OSError):
        names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    return frozenset(names)


def middlewares() -> list[Any]:
    return [errors, cors, body_limit, api_key, guard]
