"""llama-server built from the llama.cpp inside this llama-cpp-python's own source release, cached.

    python bench/llama_server.py          # build once (slow: one compiler job), then print the binary

The benches compare the bridge with what a user would run instead: llama.cpp's own server, from exactly
the llama.cpp source that the installed llama-cpp-python was built from (its sdist vendors it), built the
way both llama.cpp and llama-cpp-python build by default (Release, this machine's instruction set, shared
libraries). `pip download` fetches the sdist; the build stays in `~/.cache/st-bridge/llama-server/<version>/`
(`ST_BRIDGE_LLAMA_SERVER` names another binary) and later runs find it there. `Server` starts it on a free
port and stops it.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

DISTRIBUTION = "llama-cpp-python"
# Release build, CPU only, no network features: the same engine the Python package carries.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
)
BUILT_MARK = ".built"


def cache_root() -> Path:
    return Path.home() / ".cache" / "st-bridge" / "llama-server"


def binary(jobs: int = 1) -> Path:
    """The cached llama-server for the installed llama-cpp-python, built first if needed."""
    override = os.environ.get("ST_BRIDGE_LLAMA_SERVER")
    if override:
        return Path(override)
    version = importlib.metadata.version(DISTRIBUTION)
    folder = cache_root() / version
    target = folder / "build" / "bin" / "llama-server"
    if (folder / BUILT_MARK).exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / BUILT_MARK).exists():
            _build(version, folder, jobs)
            (folder / BUILT_MARK).write_text(version)
    return target


def _build(version: str, folder: Path, jobs: int) -> None:
    """Source in `folder/src`, build tree in `folder/build` (its shared libraries stay beside the binary)."""
    shutil.rmtree(folder / "src", ignore_errors=True)
    source = _unpack(version, folder / "src")
    build = folder / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], check=True)


def _unpack(version: str, work: Path) -> Path:
    """The vendored llama.cpp of llama-cpp-python `version`'s sdist, unpacked in `work`."""
    work.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"{DISTRIBUTION}=={version}", "-d", str(work)], check=True)
    archive = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return next(p for p in work.glob("llama_cpp_python-*") if p.is_dir()) / "vendor" / "llama.cpp"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A running llama-server on 127.0.0.1; `stop()` ends it. `url` is its base address."""

    def __init__(self, model: Path, *, ctx: int, threads: int, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(binary()), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                   "-c", str(ctx), "-t", str(threads), "-tb", str(threads), "-np", "1",
                   "--no-webui", *extra]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("llama-server did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


if __name__ == "__main__":
    print(binary())
