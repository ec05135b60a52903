"""The devices llama.cpp would use on this machine, with the RPC servers the bridge is told about.

The list is read in a child process: in the server process a CUDA query would create a GPU context
(hundreds of MiB of VRAM held for nothing), and an RPC server serves one client at a time, so the server
must not keep a connection open. A server that cannot be reached makes llama.cpp abort the process that
asked, which is why each RPC server is first asked on its own (`probe_rpc`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field

from .ggml import Device

PROBE_TIMEOUT_S = 30.0


@dataclass
class Inventory:
    devices: list[Device] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)  # RPC endpoint -> why it is left out
    error: str | None = None  # the whole probe failed (no llama_cpp, a crash): the report says why

    @property
    def offload_devices(self) -> list[Device]:
        """Devices layers can go to, in llama.cpp's default order: RPC servers first, then local GPUs."""
        found = [d for d in self.devices if d.offloads]
        return [d for d in found if d.is_rpc] + [d for d in found if not d.is_rpc]

    def to_dict(self) -> dict[str, object]:
        return {"devices": [d.to_dict() for d in self.devices], "unreachable": self.unreachable,
                "error": self.error}


def probe(rpc_servers: list[str] = (), timeout_s: float = PROBE_TIMEOUT_S) -> Inventory:  # type: ignore[assignment]
    """Devices of this build, plus those of each RPC server that answers."""
    reachable, unreachable = [], {}
    for endpoint in rpc_servers:
        problem = probe_rpc(endpoint, timeout_s)
        if problem:
            unreachable[endpoint] = problem
        else:
            reachable.append(endpoint)
    found, error = _run(reachable, timeout_s)
    return Inventory(found, unreachable, error)


def probe_rpc(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the RPC server at `endpoint` answers with at least one device, else why not."""
    found, error = _run([endpoint], timeout_s)
    if error:
        return error
    if not any(d.is_rpc for d in found):
        return f"the RPC server at {endpoint} reports no device"
    return None


def list_rpc_devices(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[list[Device], str | None]:
    """The devices one RPC server exposes (its registry name RPC<n> is this probe's, not the engine's)."""
    found, error = _run([endpoint], timeout_s)
    return [d for d in found if d.is_rpc], error


def _run(rpc_servers: list[str], timeout_s: float) -> tuple[list[Device], str | None]:
    try:
        proc = subprocess.run([sys.executable, "-m", "bridge.devices.inventory", *rpc_servers],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        where = (f" (RPC {', '.join(rpc_servers)}: busy with another client, or not answering)"
                 if rpc_servers else "")
        return [], f"the device probe did not answer within {timeout_s:.0f} s{where}"
    if proc.returncode != 0:
        return [], _failure(proc, rpc_servers)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return [], "the device probe printed nothing"
    listed = json.loads(lines[-1])["devices"]
    return [Device(**{k: v for k, v in d.items() if k != "rpc"}) for d in listed], None


def _failure(proc: subprocess.CompletedProcess[str], rpc_servers: list[str]) -> str:
    tail = llama_cpp_error(proc.stderr) or f"exit {proc.returncode}"
    if rpc_servers:
        return f"RPC server {', '.join(rpc_servers)} could not be reached or refused the connection ({tail})"
    return f"the device probe failed: {tail}"


def llama_cpp_error(stderr: str) -> str:
    """The line where llama.cpp says why it aborted ("ggml-rpc.cpp:547: Failed to connect to ..."), without
    the backtrace a debugger may print after it."""
    for line in stderr.splitlines():
        if ".cpp:" in line and ": " in line:
            return line.rsplit(".cpp:", 1)[1].split(": ", 1)[-1].strip()
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main(argv: list[str]) -> int:
    from . import ggml

    for endpoint in argv:
        ggml.add_rpc_server(endpoint)
    print(json.dumps({"devices": [d.to_dict() for d in ggml.devices()]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
