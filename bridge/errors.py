"""Errors the bridge raises, each with a message a person can act on.

Deep code raises these; the HTTP layer maps them to a status code in one middleware
(`bridge.api.middleware`), and the CLI prints the message. The hierarchy:

    BridgeError                      status 500 unless a subclass says otherwise
    ├── BadRequest                   400: the request itself is wrong
    │   └── UnsafePath               400: a model id that climbs out of the models dir
    ├── Forbidden                    403: origin / host / API key checks
    │   ├── OriginRefused            403: a browser page whose origin is not allowed
    │   └── HostRefused              403: a Host header that does not name this machine (DNS rebinding)
    ├── NotFound                     404: unknown model, download, route
    ├── Conflict                     409: e.g. a download already running for the same file
    ├── PayloadTooLarge              413
    ├── UnsupportedMediaType         415: a request body that is not JSON
    ├── Busy                         503 with Retry-After: the queue is full, or a model is loading
    ├── ModelFileError               422: a file that is not a model we can read
    │   └── GGUFError                422: a GGUF header that is truncated, corrupt or hostile
    ├── ChatTemplateError            422: a model's chat template that does not compile or refuses a chat
    ├── NotEnoughMemory              507: the model does not fit
    ├── NotEnoughDisk                507: the download does not fit on the disk
    ├── PlanFailed                   500: the planner could not place the model (nothing is loaded)
    ├── HubUnavailable               503: the Hugging Face Hub cannot be reached or answered an error
    ├── NotLoaded                    503: a companion the request needs (embedding, vision) is not loaded
    └── EngineError                  502: the llama.cpp worker failed (crash, OOM, load error)
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge reports to a user."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class BadRequest(BridgeError):
    status = 400
    code = "bad_request"


class UnsafePath(BadRequest):
    code = "unsafe_path"


class Forbidden(BridgeError):
    status = 403
    code = "forbidden"


class OriginRefused(Forbidden):
    code = "origin_not_allowed"


class HostRefused(Forbidden):
    code = "host_not_allowed"


class NotFound(BridgeError):
    status = 404
    code = "not_found"


class Conflict(BridgeError):
    status = 409
    code = "conflict"


class PayloadTooLarge(BridgeError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(BridgeError):
    status = 415
    code = "unsupported_media_type"


class Busy(BridgeError):
    status = 503
    code = "busy"

    def __init__(self, message: str, retry_after_s: int = 5, **details: object) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class ModelFileError(BridgeError):
    status = 422
    code = "bad_model_file"


class GGUFError(ModelFileError):
    code = "bad_gguf"


class ChatTemplateError(BridgeError):
    """The model's Jinja chat template does not compile, fails, or refuses a conversation."""

    status = 422
    code = "bad_chat_template"


class NotEnoughMemory(BridgeError):
    status = 507
    code = "not_enough_memory"


class NotEnoughDisk(BridgeError):
    status = 507
    code = "not_enough_disk"


class EngineError(BridgeError):
    status = 502
    code = "engine_error"


class HubUnavailable(BridgeError):
    status = 503
    code = "hub_unavailable"


class NotLoaded(BridgeError):
    """The request needs a model that is not loaded (an embedding model, a vision projector)."""

    status = 503
    code = "not_loaded"


class PlanFailed(BridgeError):
    """The planner could not work out a placement; nothing is loaded with llama.cpp's defaults instead."""

    status = 500
    code = "plan_failed"
