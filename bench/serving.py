"""What the benches share: the bridge as a user runs it (`st-bridge serve` in a subprocess), waiting for a
quiet machine, and one streamed `/completion` in llama.cpp's dialect, timed as its tokens arrive (the same
HTTP path for the bridge and for llama-server, `bench/llama_server.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.llama_server import free_port

REPO = Path(__file__).resolve().parents[1]
SERVER_IDLE_PERCENT = 5.0  # of one core: the server has finished loading and warming up
MACHINE_IDLE_PERCENT = 25.0  # of all cores: other programs leave the cores to the run


class Bridge:
    """`st-bridge serve` in a subprocess with its own empty data dir, serving `model`; `stop()` ends it."""

    def __init__(self, model: Path, *, ctx: int, flash_attn: bool, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.TemporaryDirectory(prefix="st-bridge-bench-")
        env = os.environ | {"ST_BRIDGE_CONFIG": str(Path(self.tmp.name) / "none.toml"),
                            "ST_BRIDGE_CATALOG_REFRESH": "false"}
        command = [sys.executable, "-m", "bridge", "serve", "--model", str(model), "--ctx", str(ctx),
                   "--port", str(self.port), "--data-dir", self.tmp.name, "--models-dir", self.tmp.name,
                   "--flash-attn" if flash_attn else "--no-flash-attn", *extra]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        _wait_for(lambda: get_json(f"{self.url}/bridge/v1/status").get("state") == "ready", self.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.tmp.cleanup()


def get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())
    except (OSError, ValueError):
        return {}


def post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.loads(reply.read())


def _wait_for(ready: Callable[[], bool], process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def wait_idle(pid: int, timeout_s: float = 60.0) -> bool:
    """Until the server (all its processes) has been idle for a second, and the machine nearly so; False
    when the machine stayed busy (the run is then measured anyway, and says so)."""
    server = psutil.Process(pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        processes = [server, *server.children(recursive=True)]
        for p in processes:
            p.cpu_percent(None)
        machine = psutil.cpu_percent(interval=1.0)  # percent of all cores
        own = sum(p.cpu_percent(None) for p in processes)  # percent of one core
        if own < SERVER_IDLE_PERCENT and machine < MACHINE_IDLE_PERCENT:
            return True
    return False


@dataclass
class Streamed:
    """One streamed completion: seconds to the first token and from it to the last, and the final event."""

    first_s: float
    rest_s: float
    final: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @property
    def generated(self) -> int:
        return int(self.final.get("tokens_predicted") or 0)


def stream_completion(url: str, body: dict[str, Any]) -> Streamed:
    """`POST /completion` with `"stream": true`, timed on arrival of each server-sent event."""
    request = urllib.request.Request(f"{url}/completion", data=json.dumps(body | {"stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = last = 0.0
    final: dict[str, Any] = {}
    text: list[str] = []
    with urllib.request.urlopen(request, timeout=3600) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            last = time.perf_counter()
            first = first or last
            text.append(event.get("content") or "")
            if event.get("stop"):
                final = event
    return Streamed(first - start, last - first, final, "".join(text))
