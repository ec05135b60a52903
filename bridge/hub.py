"""Hugging Face Hub access: a repository's files (exact sizes, sha256) and GGUF headers by range requests.

Everything goes through huggingface_hub (its HTTP session, its error types, `HF_ENDPOINT`), so mirrors,
tokens and proxies work as they do for the `hf` command. Hub errors become bridge errors with a message a
person can act on: `NotFound` for a missing repository or file, `HubUnavailable` when the Hub cannot be
reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from . import gguf
from .errors import Forbidden, HubUnavailable, ModelFileError, NotFound

PING_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files only (model weights always are)
    commit: str | None = None


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn huggingface_hub and network errors into bridge errors that say what failed."""
    try:
        yield
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise NotFound(f"{what}: no such repository on the Hub (or it is private)") from exc
    except EntryNotFoundError as exc:
        raise NotFound(f"{what}: no such file in the repository") from exc
    except GatedRepoError as exc:
        raise Forbidden(
            f"{what}: the repository is gated; accept its terms on the Hub and log in (`hf auth login`)"
        ) from exc
    except HfHubHTTPError as exc:
        raise HubUnavailable(f"{what}: the Hub answered {exc.response.status_code}") from exc
    except (httpx2.TransportError, OSError) as exc:
        raise HubUnavailable(f"{what}: the Hub cannot be reached ({exc})") from exc


class HubClient:
    """Model repositories on the Hub at `endpoint` (default: `HF_ENDPOINT`, else huggingface.co)."""

    def __init__(self, endpoint: str | None = None, token: str | bool | None = None) -> None:
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self._commits: dict[str, str] = {}

    def files(self, repo: str, revision: str | None = None) -> list[RemoteFile]:
        """Every file of the repository with its exact size and (for LFS files) sha256."""
        with hub_errors(repo):
            info = self.api.model_info(repo, revision=revision, files_metadata=True)
        commit = info.sha
        if commit:
            self._commits[repo] = commit
        return [
            RemoteFile(
                path=s.rfilename, size=s.size or 0, sha256=s.lfs.sha256 if s.lfs else None, commit=commit
            )
            for s in info.siblings or []
        ]

    def gguf_files(self, repo: str, revision: str | None = None) -> list[RemoteFile]:
        return [f for f in self.files(repo, revision) if f.path.lower().endswith(".gguf")]

    def commit(self, repo: str) -> str:
        return self._commits.get(repo, "main")

    def list_gguf_repos(self, author: str, limit: int) -> list[str]:
        """The `limit` most downloaded GGUF model repositories of one uploader, most downloaded first."""
        with hub_errors(f"models of {author}"):
            found = self.api.list_models(author=author, filter="gguf", sort="downloads", limit=limit)
            return [m.id for m in found]

    def ping(self, timeout: float = PING_TIMEOUT_S) -> None:
        """One cheap call that raises `HubUnavailable` when the Hub cannot be reached (offline, or down).

        huggingface_hub's list and download calls retry a dead network for half a minute; asking once
        with a short timeout first lets a background refresh give up at once when offline.
        """
        headers = build_hf_headers(token=self.token)
        with hub_errors("catalog refresh"):
            response = get_session().get(
                f"{self.endpoint}/api/models", params={"limit": 1}, headers=headers, timeout=timeout
            )
            hf_raise_for_status(response)

    def url(self, repo: str, path: str, revision: str | None = None) -> str:
        return hf_hub_url(repo, path, revision=revision or self.commit(repo), endpoint=self.endpoint)

    def read_range(self, repo: str, path: str, offset: int, size: int, revision: str | None = None) -> bytes:
        """`size` bytes at `offset` of a file, by one HTTP Range request."""
        headers = build_hf_headers(token=self.token)
        headers["Range"] = f"bytes={offset}-{offset + size - 1}"
        headers["Accept-Encoding"] = "identity"
        url = self.url(repo, path, revision)
        with (
            hub_errors(f"{repo}/{path}"),
            get_session().stream(
                "GET", url, headers=headers, follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
            ) as response,
        ):
            hf_raise_for_status(response)
            if response.status_code != 206:
                # A server that ignores Range would send the whole file: stop instead of downloading it.
                raise HubUnavailable(f"{repo}/{path}: the server does not answer range requests")
            data = b"".join(response.iter_bytes())
        return data[:size]

    def read_header(self, repo: str, paths: list[str], sizes: list[int] | None = None) -> gguf.GGUFHeader:
        """The GGUF header of a model on the Hub (all shards, in order), fetching only the header bytes."""
        sources = [
            gguf.CallbackSource(
                path, lambda off, n, p=path: self.read_range(repo, p, off, n), sizes[i] if sizes else None
            )
            for i, path in enumerate(paths)
        ]
        return gguf.read_sources(sources)


def check_runnable(repo: str, files: list[RemoteFile]) -> None:
    """Refuse repositories with nothing llama.cpp can run, saying why and what to look for instead."""
    names = [f.path.lower() for f in files]
    if any(n.endswith(".gguf") for n in names):
        return
    base = repo.split("/")[-1]
    if any(n.endswith(".safetensors") for n in names):
        method = _quant_method([*names, repo.lower()])
        what = f"{method} safetensors (a GPU format for other engines)" if method else "safetensors weights"
        raise ModelFileError(
            f"{repo} holds {what}, which llama.cpp cannot run; look for a GGUF version, "
            f'e.g. search the Hub for "{base.split("-" + method)[0] if method else base} GGUF"',
            repo=repo,
        )
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        raise ModelFileError(
            f"{repo} holds only PyTorch pickle checkpoints (.bin/.pt): loading them can run arbitrary code, "
            "so st-bridge never downloads them; look for a GGUF version of this model",
            repo=repo,
        )
    raise NotFound(f"{repo} has no GGUF file", repo=repo)


def _quant_method(names: list[str]) -> str | None:
    for method in ("gptq", "awq", "exl2", "exl3"):
        if any(method in n for n in names):
            return method.upper()
    return None
