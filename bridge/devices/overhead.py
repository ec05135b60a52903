"""The GPU memory llama.cpp uses beyond the buffers it logs, learned per GPU and driver.

The CUDA context, cuBLAS workspaces and memory pools never appear in llama.cpp's log (about 0.6 GB on
an H100 with CUDA 13, more or less elsewhere). After a load on a GPU, NVML's per-process figure minus
the logged buffers is that overhead for this GPU and driver; it is kept in the data folder and used by
every later plan instead of the H100 default. The largest figure seen is kept: plans err on the side of
fitting.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
FILE_NAME = "gpu-overhead.json"


class OverheadStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}

    def apply(self, report: Any) -> None:
        """Give each local GPU of the report the overhead learned for it."""
        known = self._read()
        for gpu in report.gpus:
            if not gpu.rpc_endpoint and key(gpu) in known:
                gpu.overhead_mib = known[key(gpu)]

    def learn(self, gpus: list[Any], loaded: Any, allocation: dict[str, Any]) -> dict[str, float]:
        """Record per-process use minus logged buffers for each GPU NVML measured. Returns what changed."""
        from ..fit import device_name

        buffers = {name: float(use.get("total_mib", 0.0))
                   for name, use in allocation.get("devices", {}).items()}
        known, changed = self._read(), {}
        for gpu in gpus:
            name = device_name(gpu, gpu.index)
            if gpu.rpc_endpoint or name not in loaded.per_process:
                continue
            overhead = max(0.0, loaded.per_process[name] - buffers.get(name, 0.0))
            if overhead > known.get(key(gpu), -1.0):
                known[key(gpu)] = changed[key(gpu)] = round(overhead, 1)
        if changed:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(json.dumps(known, indent=1, sort_keys=True))
                log.info("learned the GPU overhead beyond llama.cpp's buffers: %s", changed)
            except OSError as exc:
                log.warning("could not keep the learned GPU overhead in %s: %s", self.path, exc)
        return changed


def key(gpu: Any) -> str:
    return f"{gpu.name} | driver {gpu.driver or 'unknown'}"


def learned_overheads(data_dir: Path) -> OverheadStore:
    return OverheadStore(Path(data_dir) / FILE_NAME)
