"""The engine's vocabulary, shared by the worker, its server-side handle and the HTTP dialects.

A dialect translates its request body into one `GenerationRequest`, consumes `TokenChunk`s and turns the
final `GenerationResult` into its own response shape. Nothing here imports llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bridge.devices.placement import DevicePlacement

StopType = Literal["eos", "word", "limit", "abort", "error"]
EngineState = Literal["empty", "loading", "ready", "error"]
# The samplers of the chain's ordered part, in llama.cpp's default order (common/common.h). The dialects
# translate each client's names and numbering into these (api/translate.py); the engine builds them.
CHAIN_ORDER = (
    "penalties", "dry", "top_n_sigma", "top_k", "typical_p", "top_p", "min_p", "xtc", "temperature",
)


@dataclass
class SamplingParams:
    """ST's samplers, with llama.cpp's meaning of 'off' for each (0 or 1.0 disables)."""

    temperature: float = 0.8
    dynatemp_range: float = 0.0  # dynamic temperature: [temperature - range, temperature + range]
    dynatemp_exponent: float = 1.0
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0 = off
    typical_p: float = 1.0  # 1.0 = off
    top_n_sigma: float = -1.0  # <= 0 = off
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0  # 0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # -1 = whole context
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    dry_multiplier: float = 0.0  # 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: list[str] = field(default_factory=lambda: ["\n", ":", '"', "*"])
    mirostat: int = 0  # 0 off, 1 or 2
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int = -1  # -1 = random
    logit_bias: dict[int, float] = field(default_factory=dict)  # -inf (or a ban) removes the token
    banned_tokens: list[int] = field(default_factory=list)
    grammar: str = ""  # GBNF
    ignore_eos: bool = False
    min_tokens: int = 0
    n_probs: int = 0  # top candidates to report per token
    # The order of the samplers, in CHAIN_ORDER's names; a sampler left out is not applied. Empty =
    # CHAIN_ORDER.
    order: list[str] = field(default_factory=list)


# Where an image goes in a prompt's text (llama.cpp's mtmd default marker, set explicitly by the worker).
MEDIA_MARKER = "<__media__>"


@dataclass
class ImageInput:
    """An image for a vision model: checked and decoded in the server (`bridge.companions.images`), so the
    worker receives plain RGB pixels, never a file format llama.cpp would have to parse."""

    width: int
    height: int
    rgb: bytes  # width * height * 3 bytes, row by row
    digest: str  # sha256 of the pixels: the same image is the same chunk in the KV cache


@dataclass
class GenerationRequest:
    prompt: str | list[int]
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    add_bos: bool = True
    stream: bool = True
    n: int = 1  # replies to generate from this one prompt (ST's swipes per generation; engine/swipes.py)
    # Images, each where the prompt holds the media marker (engine/vision.py): the model needs a projector.
    images: list[ImageInput] = field(default_factory=list)


@dataclass
class TokenProb:
    token: str
    token_id: int
    logprob: float


@dataclass
class TokenChunk:
    """New text (possibly empty while a stop string might still be forming) with its token's details."""

    text: str
    token_id: int | None = None
    logprob: float | None = None
    top: list[TokenProb] = field(default_factory=list)
    index: int = 0  # which reply of an `n` > 1 request this token belongs to


@dataclass
class Timings:
    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0

    @property
    def prompt_per_second(self) -> float:
        return self.prompt_n / self.prompt_ms * 1000 if self.prompt_ms else 0.0

    @property
    def predicted_per_second(self) -> float:
        return self.predicted_n / self.predicted_ms * 1000 if self.predicted_ms else 0.0


@dataclass
class GenerationResult:
    text: str
    stop_type: StopType
    stopping_word: str = ""
    tokens_predicted: int = 0
    tokens_evaluated: int = 0  # prompt tokens in the request
    tokens_cached: int = 0  # prompt tokens reused from the KV cache (not evaluated again)
    timings: Timings = field(default_factory=Timings)
    error: str | None = None
    model_id: str = ""  # the model that served the request (a swap may have come between asking and serving)
    cache_restored: bool = False  # a saved state of this chat was brought back (chat_memory.py)
    index: int = 0  # this reply's number in an `n` > 1 request
    swipes: list[GenerationResult] = field(default_factory=list)  # replies 1..n-1 of such a request

    @property
    def finish_reason(self) -> str:
        return "length" if self.stop_type == "limit" else "stop"


@dataclass
class LoadSpec:
    """What to load and how. `None` fields are chosen by the planner."""

    model_path: str
    model_id: str
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    kv_type: str | None = None  # f16, q8_0, q4_0
    flash_attn: bool | None = None
    n_ubatch: int = 512
    n_batch: int = 2048
    n_threads: int | None = None
    # Per-chat memory (chat_memory.py): saved KV states of other chats, in MiB of RAM (0 = off) and of
    # disk in `chat_memory_dir` (0 or no folder = RAM only).
    chat_memory_mib: int = 1024
    chat_memory_disk_mib: int = 0
    chat_memory_dir: str | None = None
    # Devices, layers per device and experts in host memory, as planned. None: llama.cpp's own defaults
    # (only for direct engine use; the bridge always loads a plan).
    placement: DevicePlacement | None = None
    use_mmap: bool = True
    # A vision projector (mmproj) loaded beside the model by llama.cpp's mtmd (engine/vision.py); on the
    # GPU when `mmproj_gpu`, as the planner placed it.
    mmproj_path: str | None = None
    mmproj_gpu: bool = False


@dataclass
class EngineStatus:
    state: EngineState
    model_id: str | None = None
    model_path: str | None = None
    n_ctx: int = 0
    n_gpu_layers: int = 0
    kv_type: str = "f16"
    flash_attn: bool = False
    chat_template: str = ""
    queue_length: int = 0
    error: str | None = None
    load_progress: float = 0.0
    allocation: dict = field(default_factory=dict)  # llama.cpp's buffers per device (devices/actual.py)
    pid: int | None = None  # the worker process
    vision: dict = field(default_factory=dict)  # the projector the model sees images with (engine/vision.py)
