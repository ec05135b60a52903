"""Settings of the bridge server: one pydantic model fed by defaults, a config file, the environment
and flags.

Precedence, highest first: command-line flags, `ST_BRIDGE_*` environment variables, the config file
(`config.toml` or `config.json` in the platform's config dir, or the file named by `ST_BRIDGE_CONFIG`),
then the defaults below. Directories default to the platform's data dir (platformdirs), so models live
in e.g. `~/.local/share/st-bridge/models` on Linux.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import BadRequest
from .reach import is_loopback_host, parse_origin_pattern, split_host

APP_NAME = "st-bridge"
ENV_PREFIX = "ST_BRIDGE_"
KvType = Literal["f16", "q8_0", "q4_0"]
# Quantizers whose GGUF repositories a catalog refresh may add (the catalog's own come from the first ones).
TRUSTED_UPLOADERS = ("bartowski", "mradermacher", "TheBloke", "QuantFactory", "lmstudio-community")


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME))


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


def config_file() -> Path | None:
    """The config file in use: `ST_BRIDGE_CONFIG`, else config.toml / config.json in the config dir."""
    named = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if named:
        return Path(named)
    for name in ("config.toml", "config.json"):
        candidate = config_dir() / name
        if candidate.is_file():
            return candidate
    return None


class Settings(BaseSettings):
    """Everything `st-bridge serve` can be told. Each field is also a flag, an env var and a config key."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="address to listen on; beyond loopback needs an API key")
    port: int = Field(5001, ge=1, le=65535, description="port (KoboldCpp's, so ST's default URL works)")
    data_dir: Path = Field(default_factory=default_data_dir, description="where state and models live")
    models_dir: Path | None = Field(None, description="folder of GGUF models (default: <data_dir>/models)")
    model: str | None = Field(None, description="model to load at start: a file, or a model id in models_dir")
    ctx: int | None = Field(None, ge=256, description="context length (default: chosen by the planner)")
    gpu_layers: int | None = Field(
        None, ge=-1, description="layers on the GPU (default: chosen by the planner)"
    )
    kv_type: KvType | None = Field(None, description="KV cache type (default: chosen by the planner)")
    flash_attn: bool | None = Field(None, description="flash attention (default: chosen by the planner)")
    chat_memory_mib: int = Field(
        1024, ge=0, description="RAM (MiB) for saved KV states of other chats, restored on return; 0 = off"
    )
    chat_memory_disk_mib: int = Field(
        0, ge=0, description="disk (MiB, in <data_dir>/chat-memory) for states beyond the RAM budget"
    )
    api_key: str | None = Field(None, description="require `Authorization: Bearer <key>` on every call")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed besides this machine's loopback pages (any port), e.g. "
        "http://192.168.1.20:8000 or http://st.lan:* (any port)",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="more names that mean this machine in a Host header (its own names and addresses "
        "always count)",
    )
    docker: bool = Field(
        False,
        description="also listen on Docker's bridge gateways (Linux), for SillyTavern in a container; "
        "answers only peers inside those networks",
    )
    stall_timeout_s: float = Field(
        120.0, gt=0, le=86400,
        description="a generation whose engine reports no progress (llama.cpp's per-batch and per-node "
        "callbacks) for this long is hung: it is stopped and the model loaded again",
    )
    load_stall_s: float = Field(
        300.0, gt=0, le=86400, description="a load that reports no progress for this long is stopped"
    )
    load_timeout_s: float = Field(
        3600.0, gt=0, le=604800, description="a load that has not finished after this long is stopped"
    )
    max_body_mb: float = Field(8.0, gt=0, description="largest request body accepted, in MB")
    max_queue: int = Field(16, ge=0, description="generations that may wait; more get 503 + Retry-After")
    rpc_servers: list[str] = Field(
        default_factory=list,
        description="llama.cpp RPC servers (host:port) whose devices the planner may place layers on",
    )
    workers: list[str] = Field(
        default_factory=list,
        description="`st-bridge worker`s (host:port of their RPC port) whose devices may hold layers",
    )
    catalog_refresh: bool = Field(True, description="refresh the model catalog from the Hub while serving")
    catalog_ttl_hours: float = Field(24.0, gt=0, description="hours a refreshed catalog stays fresh")
    trusted_uploaders: list[str] = Field(
        default_factory=lambda: list(TRUSTED_UPLOADERS),
        description="Hub uploaders whose most downloaded GGUF repositories a refresh adds to the catalog",
    )
    embedding_model: str | None = Field(
        None, description="embedding model to load at start for SillyTavern's Vector Storage: a file, or a "
        "model id in models_dir (default: the one used last)",
    )
    embedding_ctx: int = Field(2048, ge=64, le=32768, description="tokens an embedding model reads per text")
    vision: bool = Field(
        True, description="load a vision projector (mmproj) found beside a model with it, for image captions",
    )
    speed_probe: bool = Field(
        True, description="measure this machine's speed once, on the first recommendation (a few seconds; "
        "kept in <data_dir>); off: speeds are estimated from the core count",
    )

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("allowed_origins")
    @classmethod
    def _origin_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            parse_origin_pattern(pattern)  # its ValueError names the pattern and the expected form
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        return [split_host(name) for name in value if name.strip()]

    @property
    def models_path(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "state.json"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_file()
        if path is not None and path.suffix == ".toml":
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        elif path is not None:
            sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
        return tuple(sources)


def load_settings(**flags: Any) -> Settings:
    """Settings with the given flags on top; flags that are None were not given and do not override."""
    try:
        return Settings(**{name: value for name, value in flags.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise BadRequest(f"invalid settings: {problems}") from exc


def is_loopback(host: str) -> bool:
    return is_loopback_host(host)


def check_exposure(settings: Settings) -> None:
    """Refuse to listen beyond loopback without an API key (anyone on the network could use the model)."""
    if is_loopback(settings.host) or settings.api_key:
        return
    raise BadRequest(
        f"refusing to listen on {settings.host} without an API key: anyone on the network could use it. "
        f"Set --api-key (or {ENV_PREFIX}API_KEY), or listen on 127.0.0.1."
    )


# --- remembered state --------------------------------------------------------------------------------


def last_model(settings: Settings) -> str | None:
    """The model loaded last time (a path), from the small state file in the data dir."""
    try:
        state = json.loads(settings.state_file.read_text())
    except (OSError, ValueError):
        return None
    value = state.get("last_model") if isinstance(state, dict) else None
    return value if isinstance(value, str) else None


def remember_model(settings: Settings, model_path: str) -> None:
    settings.state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = settings.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"last_model": model_path}))
    os.replace(tmp, settings.state_file)
