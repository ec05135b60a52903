"""The bridge's side of other machines: the RPC servers and `st-bridge worker`s it is told about, their
state, and their devices as offload devices of the plan.

A worker (`serve --worker HOST:PORT`) is checked over its HTTP endpoint (PORT+1): its versions must be the
bridge's (the same llama-cpp-python speaks the same RPC protocol; another one makes llama.cpp abort), and
it says what each device really is. A plain llama.cpp RPC server (`serve --rpc HOST:PORT`) has no such
endpoint: its devices are read through RPC itself, in a child process, and taken for GPUs.

Device names follow llama.cpp's registration order: the engine's worker registers the reachable servers in
the order listed here, and the n-th RPC device registered is RPC<n>. An RPC server serves one client at a
time, so a server's devices are read once and remembered: reading them again while a model runs on it
would wait forever.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from .info import INFO_PATH, WorkerInfo, info_port, own_versions

CHECK_TIMEOUT_S = 3.0
RTT_SAMPLES = 5


@dataclass
class RemoteDevice:
    description: str  # what the device is (GPU model, CPU model), as its server says
    kind: str  # gpu | cpu
    total_mib: int
    free_mib: int
    bandwidth_gbs: float | None = None


@dataclass
class Remote:
    """One RPC endpoint: a worker or a plain RPC server."""

    address: str  # host:port of the RPC server
    worker: bool  # an `st-bridge worker` (with its info endpoint) or a plain llama.cpp RPC server
    state: str = "unchecked"  # ready | unreachable | refused | unchecked
    message: str | None = None
    devices: list[RemoteDevice] = field(default_factory=list)
    rtt_ms: float | None = None
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "kind": "worker" if self.worker else "rpc", "state": self.state,
                "message": self.message, "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 2),
                "version": self.version,
                "devices": [d.__dict__ for d in self.devices]}


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.remotes: dict[str, Remote] = {}

    def configure(self, rpc_servers: list[str], workers: list[str]) -> None:
        with self._lock:
            wanted = [(a, False) for a in rpc_servers] + [(a, True) for a in workers]
            self.remotes = {a: self.remotes.get(a) or Remote(a, w) for a, w in wanted}

    def add(self, address: str) -> Remote:
        """A worker added while serving: checked at once, kept whatever the result, so the panel shows it."""
        check_address_form(address)
        with self._lock:
            remote = self.remotes.setdefault(address, Remote(address, True))
        return self.check(remote)

    def remove(self, address: str) -> bool:
        with self._lock:
            return self.remotes.pop(address, None) is not None

    def refresh(self) -> list[Remote]:
        """Check every worker again, and read the devices of RPC servers not read yet."""
        for remote in list(self.remotes.values()):
            if remote.worker or remote.state == "unchecked":
                self.check(remote)
        return list(self.remotes.values())

    def check(self, remote: Remote) -> Remote:
        if remote.worker:
            _check_worker(remote)
        else:
            _check_rpc_server(remote)
        return remote

    def mark_lost(self, addresses: list[str], why: str) -> None:
        for address in addresses:
            if address in self.remotes:
                self.remotes[address].state, self.remotes[address].message = "unreachable", why

    def ready(self) -> list[Remote]:
        return [r for r in self.remotes.values() if r.state == "ready"]

    def endpoints(self) -> list[str]:
        """Reachable endpoints, in registration order."""
        return [r.address for r in self.ready()]

    def gpus(self) -> list[Any]:
        """The ready remotes' devices as the planner's offload devices, named RPC0, RPC1 ... as the engine's
        worker will register them."""
        from ..hardware import GPUInfo

        found = []
        for remote in self.ready():
            for device in remote.devices:
                n = len(found)
                found.append(GPUInfo(
                    index=n, name=f"{device.description} on {remote.address}", total_mib=device.total_mib,
                    free_mib=device.free_mib, used_mib=max(0, device.total_mib - device.free_mib),
                    bandwidth_gbs=device.bandwidth_gbs, device=f"RPC{n}", rpc_endpoint=remote.address,
                    kind=device.kind, rtt_ms=remote.rtt_ms))
        return found

    def to_list(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.remotes.values()]


def check_address_form(address: str) -> tuple[str, int]:
    from ..errors import BadRequest

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise BadRequest(f"a worker is named HOST:PORT (its RPC port), not {address!r}")
    return host.strip("[]"), int(port)


def _check_worker(remote: Remote) -> None:
    host, port = check_address_form(remote.address)
    url = f"http://{_url_host(host)}:{info_port(port)}{INFO_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=CHECK_TIMEOUT_S) as reply:
            info = WorkerInfo.from_dict(json.loads(reply.read()))
    except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError) as exc:
        remote.state, remote.devices = "unreachable", []
        remote.message = (f"the worker at {remote.address} does not answer ({_why(exc)}); "
                          "left out of the plan")
        return
    remote.version = f"st-bridge {info.version}, llama-cpp-python {info.llama_cpp_version}"
    ours = own_versions()
    if (info.version, info.llama_cpp_version) != ours:
        remote.state, remote.devices = "refused", []
        remote.message = (f"the worker at {remote.address} runs st-bridge {info.version} with "
                          f"llama-cpp-python {info.llama_cpp_version}, this bridge st-bridge {ours[0]} with "
                          "llama-cpp-python "
                          f"{ours[1]}: llama.cpp's RPC protocol must match on both ends, so it is not used; "
                          "install the same version there")
        return
    remote.devices = [RemoteDevice(d.description, d.kind, d.total_mib, d.free_mib, d.bandwidth_gbs)
                      for d in info.devices]
    remote.rtt_ms = remote.rtt_ms or measure_rtt(host, info_port(port))
    remote.state, remote.message = "ready", None


def _check_rpc_server(remote: Remote) -> None:
    from ..devices import inventory

    problem = inventory.probe_rpc(remote.address)
    if problem:
        remote.state, remote.message, remote.devices = "unreachable", f"{problem}; left out of the plan", []
        return
    found, _ = inventory.list_rpc_devices(remote.address)
    remote.devices = [RemoteDevice(d.description, "gpu", d.total_mib, d.free_mib) for d in found]
    host, port = check_address_form(remote.address)
    remote.rtt_ms = measure_rtt(host, port)
    remote.state, remote.message = "ready", None


def measure_rtt(host: str, port: int) -> float | None:
    """Median time of a TCP connect, in ms: one network round trip (measured once per worker)."""
    samples = []
    for _ in range(RTT_SAMPLES):
        start = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=CHECK_TIMEOUT_S):
                samples.append((time.perf_counter() - start) * 1000)
        except OSError:
            return None
    return statistics.median(samples)


def lost(addresses: list[str], timeout_s: float = 1.0) -> list[str]:
    """The endpoints whose RPC port no longer accepts a connection."""
    gone = []
    for address in addresses:
        host, port = check_address_form(address)
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError:
            gone.append(address)
    return gone


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _why(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)


registry = Registry()  # the bridge's, configured by `serve`
