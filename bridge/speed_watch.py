"""Predicted beside measured speed of the loaded model, for the status.

After a load the bridge predicts the model's speeds on the placement it planned (`speed.predict`, with this
machine's measured CPU figures when a recommendation has measured them). Every generation then reports
what the engine really did (`GenerationResult.timings`); the watch adds them up and, for the same prompts
(each with the tokens it really read, after the ones reused from the cache), what the prediction said they
would take. The status shows both and their ratio, so a prediction that is off shows after one reply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import calibrate, fit, speed
from .engine.types import GenerationResult
from .errors import BridgeError
from .gguf import read_file
from .hardware import GPUInfo, HardwareReport

log = logging.getLogger(__name__)

MIN_PROMPT_TOKENS = 32  # shorter prompt reads are mostly fixed costs, not speed
MIN_WRITTEN_TOKENS = 4


@dataclass
class SpeedWatch:
    model_id: str | None = None
    predicted: speed.Prediction | None = None
    cost: speed.ModelCost | None = None
    breakdown: fit.Breakdown | None = None
    gpus: list[GPUInfo] = field(default_factory=list)
    cpu: speed.CpuSpeed | None = None
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("prompt_tokens", "prompt_ms", "prompt_predicted_ms", "written_tokens", "written_ms",
         "written_predicted_ms", "generations"), 0.0))

    @classmethod
    def after_load(cls, model_path: str, model_id: str, summary: dict[str, Any], report: HardwareReport,
                   data_dir: Path | None) -> SpeedWatch:
        """The prediction for the plan `summary` (fit.Plan.to_dict) the model was loaded with. Uses a CPU
        measurement already made, never starts one (a load must not wait for it)."""
        try:
            layout = fit.ModelLayout.from_header(read_file(model_path))
            bd = breakdown_of(summary)
        except (BridgeError, OSError, KeyError, TypeError, ValueError) as exc:  # never fails a load
            log.warning("no speed prediction for %s: %s", model_id, exc)
            return cls(model_id)
        cpu = calibrate.cpu_speed(data_dir, report, measure_missing=False)
        cost = speed.ModelCost.of(layout)
        return cls(model_id, speed.predict(cost, bd, report, cpu), cost, bd, list(report.usable_gpus), cpu)

    def observe(self, result: GenerationResult) -> None:
        """Add a finished generation's timings (and what the prediction said they would be)."""
        cost, bd, cpu = self.cost, self.breakdown, self.cpu
        if cost is None or bd is None or cpu is None or result.model_id != self.model_id:
            return
        t, totals = result.timings, self.totals
        totals["generations"] += 1
        if t.prompt_n >= MIN_PROMPT_TOKENS and t.prompt_ms > 0:
            kv_len = result.tokens_cached + t.prompt_n / 2
            per_token = speed.prompt_seconds(cost, bd, self.gpus, cpu, kv_len)
            totals["prompt_tokens"] += t.prompt_n
            totals["prompt_ms"] += t.prompt_ms
            totals["prompt_predicted_ms"] += t.prompt_n * per_token * 1000
        if t.predicted_n >= MIN_WRITTEN_TOKENS and t.predicted_ms > 0:
            per_token = speed.decode_seconds(cost, bd, self.gpus, cpu)
            totals["written_tokens"] += t.predicted_n
            totals["written_ms"] += t.predicted_ms
            totals["written_predicted_ms"] += t.predicted_n * per_token * 1000

    def to_dict(self) -> dict[str, Any]:
        t = self.totals
        measured = {
            "prompt_tok_s": _rate(t["prompt_tokens"], t["prompt_ms"]),
            "decode_tok_s": _rate(t["written_tokens"], t["written_ms"]),
            "prompt_tokens": int(t["prompt_tokens"]),
            "written_tokens": int(t["written_tokens"]),
            "generations": int(t["generations"]),
        }
        return {
            "model": self.model_id,
            "predicted": self.predicted.to_dict() if self.predicted else None,
            "measured": measured,
            # measured speed / predicted speed over the same prompts and replies (1.0: exact)
            "measured_vs_predicted": {
                "prompt": _ratio(t["prompt_predicted_ms"], t["prompt_ms"]),
                "decode": _ratio(t["written_predicted_ms"], t["written_ms"]),
            },
        }


def breakdown_of(summary: dict[str, Any]) -> fit.Breakdown:
    """The planner's breakdown back from its summary (GPUs first, the host last)."""
    devices = summary["devices"]

    def figures(d: dict[str, Any]) -> tuple[str, float, float, float, float]:
        return (d.get("name", d.get("device", "")), float(d["weights_mib"]), float(d["kv_mib"]),
                float(d["compute_mib"]), float(d.get("overhead_mib", 0.0)))

    host = fit.HostMemory(*figures(devices[-1]))
    return fit.Breakdown(int(summary["n_ctx"]), int(summary["n_ubatch"]), int(summary["gpu_layers"]),
                         int(summary["n_layer"]), summary["kv_type_k"], summary["kv_type_v"],
                         bool(summary["flash_attn"]), int(summary.get("n_cpu_moe", 0)),
                         [fit.DeviceMemory(*figures(d)) for d in devices[:-1]], host)


def _rate(tokens: float, ms: float) -> float | None:
    return round(tokens / ms * 1000, 1) if tokens and ms else None


def _ratio(predicted_ms: float, measured_ms: float) -> float | None:
    return float(f"{predicted_ms / measured_ms:.3g}") if predicted_ms and measured_ms else None
