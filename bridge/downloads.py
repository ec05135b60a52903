"""GGUF downloads from the Hub into the models dir: progress, resume, cancel, sha256, shards as one unit.

A download is one *unit*: a single GGUF file, or every shard of a split model. Each file goes through
huggingface_hub's `http_get` (its session, retries and Range resume within a transfer) into a partial file
`<name>.incomplete` next to its destination that survives a crash or a restart, so the next pull of the same
file sends `Range` and fetches only the rest. A file lock makes two pulls of the same file (two processes, or
two threads) take turns; the second one finds the file done. Before any byte moves the free disk space is
checked; after the last byte the sha256 is compared with the Hub's LFS hash, and only a file that matches is
moved into place (atomic `os.replace`). A corrupt file is removed with a clear error; a cancelled unit
leaves nothing behind.

Files land in `<models dir>/<owner>/<repo>/<path in repo>`. A file whose blob already sits in the Hugging Face
cache (same sha256) is linked or copied from there instead of downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from huggingface_hub import constants
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers

from . import files as file_ops
from .errors import BadRequest, BridgeError, Conflict, ModelFileError, NotEnoughDisk, NotFound, UnsafePath
from .formats import parse_name
from .hub import HubClient, RemoteFile, check_runnable, hub_errors
from .library import is_projector, model_id
from .safe_names import name_problem

EventSink = Callable[[str, dict[str, Any]], None]
# Room left on the disk after a download: a full disk breaks everything else on the machine too.
DISK_RESERVE_BYTES = 512 << 20
EVENT_INTERVAL_S = 0.25
HASH_CHUNK = 8 << 20


class Cancelled(BridgeError):
    """Raised inside a transfer when its download was cancelled (never reaches a user as an error)."""

    status = 409
    code = "cancelled"


@dataclass
class Download:
    id: str
    repo: str
    quant: str | None
    files: list[RemoteFile]
    dest: list[Path]
    state: str = "queued"  # queued, running, verifying, done, failed, cancelled
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_resumed: int = 0  # already on disk when this run started
    rate_bps: float = 0.0
    eta_s: float | None = None
    error: str | None = None
    reused: list[str] = field(default_factory=list)  # files taken from the HF cache or already present
    exception: BridgeError | None = field(default=None, repr=False)
    started_at: float | None = None
    finished_at: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    done_event: threading.Event = field(default_factory=threading.Event, repr=False)
    model_id: str = ""  # the id the model will have in the models dir (clients need not parse OS paths)

    @property
    def path(self) -> Path:
        """The file to load: the single file, or the first shard."""
        return self.dest[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "repo": self.repo,
            "quant": self.quant,
            "files": [f.path for f in self.files],
            "path": str(self.path),
            "model_id": self.model_id,
            "state": self.state,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "rate_bps": round(self.rate_bps),
            "eta_s": self.eta_s,
            "error": self.error,
            "reused": self.reused,
        }


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (its nearest existing parent)."""
    for p in [path, *path.parents]:
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage(Path.cwd()).free


class DownloadManager:
    """Queues units and runs them one at a time in a worker thread; `on_event` hears their progress.

    Events: `download_progress` (throttled to one per EVENT_INTERVAL_S per download), `download_done`,
    `download_error`, `download_cancelled`, each with `Download.to_dict()` as data. `on_event` is called
    from the worker thread.
    """

    def __init__(
        self,
        models_dir: Path,
        hub: HubClient | None = None,
        *,
        on_event: EventSink | None = None,
        free_bytes: Callable[[Path], int] = free_disk_bytes,
        hf_cache_dir: Path | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.hub = hub or HubClient()
        self.on_event = on_event
        self.free_bytes = free_bytes
        self.hf_cache_dir = Path(hf_cache_dir or constants.HF_HUB_CACHE)
        self._downloads: dict[str, Download] = {}
        self._queue: list[Download] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._ids = itertools.count(1)

    # --- public API ----------------------------------------------------------------------------------

    def resolve(
        self, repo: str, *, quant: str | None = None, file: str | None = None
    ) -> tuple[str | None, list[RemoteFile]]:
        """The files of one unit: the named file (and its sibling shards) or the named quant."""
        if quant and file:
            raise BadRequest("name either a quant or a file, not both")
        files = self.hub.files(repo)
        check_runnable(repo, files)
        ggufs = [f for f in files if f.path.lower().endswith(".gguf")]
        if file:
            chosen = [f for f in ggufs if f.path == file]
            if not chosen:
                raise NotFound(
                    f"{repo} has no file {file!r}; its GGUF files: {', '.join(f.path for f in ggufs)}"
                )
            hints = parse_name(Path(file).name)
            quant = hints.quant
            if hints.split_part:
                stem = _shard_stem(file)
                chosen = sorted((f for f in ggufs if _shard_stem(f.path) == stem), key=lambda f: f.path)
            return quant, _with_projector(ggufs, chosen)
        if not quant:
            raise BadRequest("name a quant (e.g. Q5_K_M) or a file; `st-bridge recommend` suggests one")
        chosen = sorted(
            (f for f in ggufs if (parse_name(Path(f.path).name).quant or "").upper() == quant.upper()
             and not is_projector(f.path)),
            key=lambda f: f.path,
        )
        if not chosen:
            have = sorted({q for f in ggufs if (q := parse_name(Path(f.path).name).quant)})
            raise NotFound(
                f"{repo} has no {quant} file; quants there: {', '.join(have) or 'none recognised'}"
            )
        if not parse_name(Path(chosen[0].path).name).split_part:
            chosen = chosen[:1]
        return quant, _with_projector(ggufs, chosen)

    def submit(self, repo: str, *, quant: str | None = None, file: str | None = None) -> Download:
        """Queue a unit; returns at once. A unit already queued or running is returned, not queued twice."""
        quant, files = self.resolve(repo, quant=quant, file=file)
        dest = [self.destination(repo, f.path) for f in files]
        with self._lock:
            for d in self._downloads.values():
                if d.dest == dest and d.state in ("queued", "running", "verifying"):
                    return d
            dl = Download(
                id=str(next(self._ids)),
                repo=repo,
                quant=quant,
                files=files,
                dest=dest,
                bytes_total=sum(f.size for f in files),
                model_id=model_id(dest[0], self.models_dir),
            )
            self._downloads[dl.id] = dl
            self._queue.append(dl)
            self._ensure_worker()
            self._wake.notify()
        return dl

    def pull(self, repo: str, *, quant: str | None = None, file: str | None = None) -> Download:
        """Download a unit now, in this thread (the CLI's way); raises on failure."""
        quant, files = self.resolve(repo, quant=quant, file=file)
        dest = [self.destination(repo, f.path) for f in files]
        dl = Download(
            id=str(next(self._ids)),
            repo=repo,
            quant=quant,
            files=files,
            dest=dest,
            bytes_total=sum(f.size for f in files),
            model_id=model_id(dest[0], self.models_dir),
        )
        with self._lock:
            self._downloads[dl.id] = dl
        self._run(dl)
        if dl.state != "done":
            raise _error_for(dl)
        return dl

    def get(self, download_id: str) -> Download:
        try:
            return self._downloads[download_id]
        except KeyError:
            raise NotFound(f"no download {download_id!r}; GET /bridge/v1/downloads lists them") from None

    def list(self) -> list[Download]:
        return list(self._downloads.values())

    def cancel(self, download_id: str) -> Download:
        """Stop a download and remove its partial data (a queued one just leaves the queue)."""
        dl = self.get(download_id)
        with self._lock:
            if dl in self._queue:
                self._queue.remove(dl)
                self._finish(dl, "cancelled")
                return dl
        dl.cancel_event.set()
        return dl

    def wait(self, download_id: str, timeout: float | None = None) -> Download:
        dl = self.get(download_id)
        dl.done_event.wait(timeout)
        return dl

    def destination(self, repo: str, path: str) -> Path:
        """Where a repository file lands, strictly inside the models dir, under any platform's path rules.

        Hub paths use `/` on every platform; each part must be a name Windows accepts too (see
        `safe_names`), since a `:` there would leave the models dir.
        """
        owner_name = repo.split("/")
        parts = [*owner_name, *path.split("/")]
        problems = [f"{p!r} {problem}" for p in parts if (problem := name_problem(p))]
        if len(owner_name) != 2 or problems:
            why = "; ".join(problems) or "a repository is owner/name"
            raise UnsafePath(f"{repo}/{path} is not a repository file name: {why}")
        dest = self.models_dir.joinpath(*parts)
        if not dest.is_relative_to(self.models_dir):  # the rules above rule it out; kept as the last word
            raise UnsafePath(f"{repo}/{path} would land outside the models dir {self.models_dir}")
        return dest

    def delete(self, path: Path) -> list[Path]:
        """Delete a downloaded model (all shards of a split one) from the models dir."""
        path = Path(path).resolve()
        root = self.models_dir.resolve()
        if root not in path.parents:
            raise UnsafePath(f"{path} is not inside the models dir {root}")
        targets = [path]
        if parse_name(path.name).split_part:
            stem = _shard_stem(path.name)
            targets = sorted(p for p in path.parent.glob("*.gguf") if _shard_stem(p.name) == stem)
        removed = []
        for p in targets:
            with _file_lock(p, timeout=0):
                file_ops.unlink(p)  # a model the bridge has open cannot be deleted on Windows: FileInUse
                removed.append(p)
        return removed

    # --- the worker ----------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="downloads", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    if not self._wake.wait(timeout=30):
                        self._worker = None
                        return
                dl = self._queue.pop(0)
            self._run(dl)

    def _run(self, dl: Download) -> None:
        """Run one unit to an end state (done, failed, cancelled); never raises."""
        dl.state, dl.started_at = "running", time.monotonic()
        written: list[Path] = []
        try:
            self._check_disk(dl)
            for remote, dest in zip(dl.files, dl.dest, strict=True):
                if self._fetch_file(dl, remote, dest):
                    written.append(dest)
        except Cancelled:
            # A unit is all or nothing: shards this run completed go too (partial files went in _fetch_file).
            for dest in written:
                dest.unlink(missing_ok=True)
            self._finish(dl, "cancelled")
        except BridgeError as exc:
            dl.exception = exc
            dl.error = exc.message
            if any(_partial_path(d).exists() for d in dl.dest):
                dl.error += "; the part already downloaded is kept: pull again to resume where it stopped"
            self._finish(dl, "failed")
        except Exception as exc:  # an unexpected failure: report it, never kill the worker thread
            dl.exception = BridgeError(f"{dl.repo}: download failed: {exc}")
            dl.error = dl.exception.message
            self._finish(dl, "failed")
        else:
            dl.bytes_done = dl.bytes_total
            self._finish(dl, "done")

    def _finish(self, dl: Download, state: str) -> None:
        dl.state, dl.finished_at, dl.eta_s = state, time.monotonic(), None
        dl.done_event.set()
        self._emit(
            {"done": "download_done", "failed": "download_error"}.get(state, "download_cancelled"), dl
        )

    def _emit(self, name: str, dl: Download) -> None:
        if self.on_event is not None:
            self.on_event(name, dl.to_dict())

    def _check_disk(self, dl: Download) -> None:
        needed = sum(
            f.size - _partial_size(d, f)
            for f, d in zip(dl.files, dl.dest, strict=True)
            if not _complete(d, f)
        )
        free = self.free_bytes(self.models_dir)
        if needed + DISK_RESERVE_BYTES > free:
            raise NotEnoughDisk(
                f"{dl.repo}: needs {_gb(needed)} GB more and {self.models_dir} has {_gb(free)} GB free "
                f"(keeping {_gb(DISK_RESERVE_BYTES)} GB spare); free some space or choose a smaller quant",
                needed_bytes=needed,
                free_bytes=free,
            )

    def _fetch_file(self, dl: Download, remote: RemoteFile, dest: Path) -> bool:
        """Bring one file into place; True if this call wrote it (so a cancel of the unit removes it)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(dest, cancel=dl.cancel_event):
            if _complete(dest, remote):
                dl.reused.append(remote.path)
                return False
            if self._reuse_from_hf_cache(remote, dest):
                dl.reused.append(remote.path)
                return True
            partial = _partial_path(dest)
            with partial.open("ab") as fh:
                resume = fh.tell()
                if resume > remote.size:  # a partial file from another version of the file
                    fh.truncate(0)
                    resume = 0
                dl.bytes_resumed += resume
                bar = functools.partial(
                    _Progress, manager=self, download=dl, base=self._done_before(dl, remote)
                )
                try:
                    with hub_errors(f"{dl.repo}/{remote.path}"):
                        http_get(
                            self.hub.url(dl.repo, remote.path, remote.commit),
                            fh,
                            resume_size=resume,
                            headers=build_hf_headers(token=self.hub.token),
                            expected_size=remote.size,
                            displayed_filename=remote.path,
                            tqdm_class=bar,  # type: ignore[arg-type]
                        )
                except Cancelled:
                    # Removed while the lock is held: a partial file is only ever touched by its lock holder.
                    fh.close()
                    partial.unlink(missing_ok=True)
                    raise
            dl.state = "verifying"
            self._emit("download_progress", dl)
            try:
                self._verify(dl, remote, partial)
            except Cancelled:
                partial.unlink(missing_ok=True)
                raise
            file_ops.replace(partial, dest)  # FileInUse when an older `dest` is open (Windows)
            dl.state = "running"
            return True

    def _done_before(self, dl: Download, remote: RemoteFile) -> int:
        before = 0
        for f in dl.files:
            if f is remote:
                break
            before += f.size
        return before

    def _verify(self, dl: Download, remote: RemoteFile, partial: Path) -> None:
        if not remote.sha256:
            return
        digest = _sha256(partial, dl.cancel_event)
        if digest != remote.sha256:
            partial.unlink(missing_ok=True)
            raise ModelFileError(
                f"{dl.repo}/{remote.path}: the downloaded file is corrupt (sha256 {digest[:12]}… but the Hub "
                f"says {remote.sha256[:12]}…); it was removed, pull again to download it afresh",
                file=remote.path,
            )

    def _reuse_from_hf_cache(self, remote: RemoteFile, dest: Path) -> bool:
        """Hard-link (or copy) a blob with the same sha256 from the Hugging Face cache."""
        if not remote.sha256 or not self.hf_cache_dir.is_dir():
            return False
        for blob in self.hf_cache_dir.glob(f"models--*/blobs/{remote.sha256}"):
            if blob.stat().st_size != remote.size:
                continue
            tmp = _partial_path(dest).with_suffix(".link")
            tmp.unlink(missing_ok=True)
            try:
                os.link(blob, tmp)
            except OSError:  # another filesystem, or links not allowed: copy
                shutil.copyfile(blob, tmp)
            file_ops.replace(tmp, dest)
            return True
        return False


class _Progress:
    """The progress-bar object huggingface_hub's `http_get` drives; turns its updates into events.

    It is also the cancel point: `update` raises `Cancelled` when the download was cancelled, which
    unwinds the transfer from inside `http_get`.
    """

    def __init__(
        self, *, manager: DownloadManager, download: Download, base: int, initial: int = 0, **_: Any
    ) -> None:
        self.manager, self.dl, self.base = manager, download, base
        self.n = initial
        self._last_emit = 0.0
        self._t0 = time.monotonic()
        self._n0 = initial
        self._update_state()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def update(self, n: int | float = 1) -> None:
        if self.dl.cancel_event.is_set():
            raise Cancelled(f"{self.dl.repo}: download cancelled")
        self.n += int(n)
        self._update_state()
        now = time.monotonic()
        if now - self._last_emit >= EVENT_INTERVAL_S:
            self._last_emit = now
            self.manager._emit("download_progress", self.dl)

    def _update_state(self) -> None:
        dl = self.dl
        dl.bytes_done = self.base + self.n
        elapsed = time.monotonic() - self._t0
        if elapsed > 0.05:
            dl.rate_bps = (self.n - self._n0) / elapsed
        left = dl.bytes_total - dl.bytes_done
        dl.eta_s = round(left / dl.rate_bps, 1) if dl.rate_bps > 0 else None


# --- helpers -------------------------------------------------------------------------------------------


def _partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".incomplete")


def _partial_size(dest: Path, remote: RemoteFile) -> int:
    try:
        size = _partial_path(dest).stat().st_size
    except OSError:
        return 0
    return size if size <= remote.size else 0


def _complete(dest: Path, remote: RemoteFile) -> bool:
    # Only a verified file is ever moved into place, so the right size at `dest` means done.
    try:
        return dest.stat().st_size == remote.size
    except OSError:
        return False


class _file_lock:
    """An inter-process lock on `<dest>.lock` that stays responsive to a cancel while waiting."""

    def __init__(
        self, dest: Path, *, cancel: threading.Event | None = None, timeout: float | None = None
    ) -> None:
        self.lock = FileLock(str(dest.with_name(dest.name + ".lock")))
        self.cancel = cancel
        self.timeout = timeout

    def __enter__(self) -> None:
        if self.timeout is not None:
            try:
                self.lock.acquire(timeout=self.timeout)
            except Timeout:
                raise Conflict(f"{self.lock.lock_file} is held: a download of this file is running") from None
            return
        while True:
            try:
                self.lock.acquire(timeout=0.2)
                return
            except Timeout:
                if self.cancel is not None and self.cancel.is_set():
                    raise Cancelled(
                        "download cancelled while waiting for another pull of the same file"
                    ) from None

    def __exit__(self, *_: object) -> None:
        self.lock.release()


def _sha256(path: Path, cancel: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            if cancel is not None and cancel.is_set():
                raise Cancelled("download cancelled while verifying")
            h.update(chunk)
    return h.hexdigest()


def _with_projector(ggufs: list[RemoteFile], chosen: list[RemoteFile]) -> list[RemoteFile]:
    """A vision model's weights come with the projector beside them in the repository (the bridge pairs
    them again in the models folder, bridge.companions.pairing); a projector asked for alone comes alone."""
    from .companions.pairing import remote_projector

    if not chosen or is_projector(chosen[0].path):
        return chosen
    projector = remote_projector(ggufs, chosen[0].path)
    return [*chosen, projector] if projector is not None else chosen


def _shard_stem(path: str) -> str:
    name = Path(path).name
    hints = parse_name(name)
    if not hints.split_part:
        return path
    return str(Path(path).parent / name.split(f"-{hints.split_part[0]:05d}-of-")[0])


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f}"


def _error_for(dl: Download) -> BridgeError:
    if dl.state == "cancelled":
        return Cancelled(f"{dl.repo}: download cancelled")
    return dl.exception or BridgeError(dl.error or "download failed")
