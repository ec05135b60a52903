"""The HTTP edge: errors → status + JSON (one envelope per dialect), reach checks, CORS, body rules, API key.

Order (outermost first): errors, reach, CORS, body size, API key, JSON bodies. Errors is outermost so every
refusal below it gets the same JSON envelope and the CORS headers. The reach checks (`bridge.reach`) apply
to every endpoint: a Host header that does not name this machine (DNS rebinding), a browser `Origin` that
is not allowed, and a peer outside Docker's networks on a Docker gateway address are refused before any
handler runs. SillyTavern's server sends no `Origin`, so it passes the origin check by construction.

A CORS preflight is answered for any origin: it changes nothing, and it lets the browser send the real
request, whose refusal (403, with CORS headers so the page can read it) names the origin and the setting
that would allow it. The ST panel shows that message instead of "not reachable".
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import (
    BadRequest,
    BridgeError,
    Busy,
    Forbidden,
    HostRefused,
    OriginRefused,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from ..reach import host_refusal, origin_refusal
from . import REACH_KEY, SETTINGS_KEY

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
    415: "invalid_request_error",
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
    except OriginRefused as exc:
        # Readable by the refused page itself (it learns nothing but this message), so the panel can show it.
        origin = request.headers.get("Origin")
        return web.json_response(
            error_body(dialect_of(request.path), exc.status, exc.code, exc.message, **_jsonable(exc.details)),
            status=exc.status, headers=_cors_headers(origin),
        )
    except BridgeError as exc:
        return error_response(request, exc.status, exc.code, exc.message, **_jsonable(exc.details))
    except web.HTTPRequestEntityTooLarge:
        return _too_large(request)
    except json.JSONDecodeError as exc:
        return error_response(request, 400, "bad_json", f"the request body is not valid JSON: {exc}")
    except (UnicodeDecodeError, LookupError) as exc:  # request.text(): bad bytes, or an unknown charset
        return error_response(request, 400, "bad_json", f"the request body is not UTF-8 JSON: {exc}")
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


# --- reach: Host, Origin, Docker peers ---------------------------------------------------------------


@web.middleware
async def reach(request: web.Request, handler: Handler) -> web.StreamResponse:
    rules = request.app[REACH_KEY]
    host = request.headers.get("Host")
    if not rules.hosts.allows(host):
        raise HostRefused(host_refusal(host or ""), host=host)
    local, peer = _socket_addresses(request)
    if not rules.peer_allowed(local, peer):
        raise Forbidden(f"{local} serves Docker containers only, and {peer} is not in a Docker network")
    origin = request.headers.get("Origin")
    if origin is not None and not _is_preflight(request) and not rules.origin_allowed(origin):
        raise OriginRefused(origin_refusal(origin), origin=origin)
    return await handler(request)


def _socket_addresses(request: web.Request) -> tuple[str | None, str | None]:
    transport = request.transport
    if transport is None:
        return None, None
    local, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
    return (local[0] if isinstance(local, tuple) else None), (peer[0] if isinstance(peer, tuple) else None)


def _is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


# --- CORS --------------------------------------------------------------------------------------------


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if _is_preflight(request):
        return web.Response(status=204, headers=_cors_headers(origin, preflight=True))
    response = await handler(request)
    if not response.prepared:
        response.headers.update(cors_headers_for(request))
    return response


def _cors_headers(origin: str | None, preflight: bool = False) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin or "", "Vary": "Origin"}
    if preflight:
        headers |= CORS_HEADERS | {"Access-Control-Allow-Private-Network": "true"}
    return headers


def cors_headers_for(request: web.Request) -> dict[str, str]:
    """CORS headers for a response to an allowed origin (streamed ones are prepared before the CORS
    middleware sees them, so their handlers add these themselves)."""
    origin = request.headers.get("Origin")
    if origin is None or not request.app[REACH_KEY].origin_allowed(origin):
        return {}
    return _cors_headers(origin)


# --- body size, API key, JSON bodies -----------------------------------------------------------------


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
    if key is None or request.method == "OPTIONS" or _key_matches(request, key):
        return await handler(request)
    return error_response(
        request,
        401,
        "unauthorized",
        "this bridge needs an API key: send `Authorization: Bearer <key>` "
        "(in ST, fill in the API key field of the connection)",
    )


def _key_matches(request: web.Request, key: str) -> bool:
    """`Authorization: Bearer <key>` (ST's API key field), or `X-API-Key: <key>` (the panel, when its
    calls travel through SillyTavern's server, whose own Basic auth may hold the Authorization header)."""
    bearer = request.headers.get("Authorization", "")
    sent = bearer[7:] if bearer.startswith("Bearer ") else request.headers.get("X-API-Key", "")
    return hmac.compare_digest(sent.encode(), key.encode())


@web.middleware
async def json_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request bodies are JSON, and only JSON, on every endpoint; numbers in them are finite and short.

    A web page can send a `text/plain` or form body anywhere without asking first; JSON it cannot, so
    this closes cross-site requests that reach the bridge without an Origin (through a proxy). Mutating
    management calls must say JSON even without a body. The body is parsed once here with bounds, so no
    handler meets a 5,000-digit integer or NaN: those are a 400 that says why.
    """
    if request.method not in MUTATING:
        return await handler(request)
    is_json = request.content_type == "application/json" or request.path in UNTYPED_JSON_PATHS
    if request.body_exists and not is_json:
        raise UnsupportedMediaType(
            f"send the body as JSON with `Content-Type: application/json` (got {request.content_type!r})"
        )
    if not is_json and request.path.startswith(MANAGE_PREFIX):
        raise UnsupportedMediaType("management calls that change something accept only application/json")
    if request.body_exists:
        loads_strict(await request.text())
    return await handler(request)


# JSON that SillyTavern's server sends without saying so (KoboldCpp's embeddings call carries no
# Content-Type, so node-fetch labels it text/plain). A browser page posting there cross-site still sends
# its Origin, which the reach check refuses.
UNTYPED_JSON_PATHS = {"/api/extra/embeddings"}
MAX_NUMBER_DIGITS = 40  # any real field fits in 64 bits; json.loads would spend quadratic time on more


def loads_strict(text: str) -> Any:
    """json.loads without NaN, Infinity, numbers that overflow to infinity, or absurdly long integers."""
    return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        raise BadRequest(f"a number in the body has {digits} digits; numbers here have at most "
                         f"{MAX_NUMBER_DIGITS}")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or len(text) > 400:
        raise BadRequest(f"the number {text[:40]}… is out of range: numbers here must be finite")
    return value


def _constant(name: str) -> float:
    raise BadRequest(f"{name} is not a number JSON allows; send a finite number")


def middlewares() -> list[Any]:
    return [errors, reach, cors, body_limit, api_key, json_bodies]
