"""`st-bridge worker`: lend this machine's GPU (or CPU) to a bridge on another machine.

Two listeners on one address: llama.cpp's RPC server on PORT, started from this llama-cpp-python's own
libggml-rpc (`bridge.devices.rpc_server`, in a child process), so the bridge and the worker speak the same
protocol when they run the same version; and a small HTTP endpoint on PORT+1 that reports what RPC cannot
(`GET /worker`: device kind, name, memory, bandwidth, versions).

The RPC protocol has no authentication and has had remote-crash bugs. The worker listens on 127.0.0.1
unless told otherwise, and another address needs `--trusted-network`: reach it through an SSH tunnel or
a VPN (README, "Several machines").
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from typing import Any

from aiohttp import web

from ..devices.rpc_server import DEFAULT_PORT, is_loopback
from ..errors import BadRequest
from .info import INFO_PATH, info_port, local_info

NETWORK_WARNING = (
    "llama.cpp's RPC protocol has no authentication and has had remote-crash bugs: anyone who can reach "
    "this port can use this machine's memory and crash the worker. Listen on a trusted home network only, "
    "or keep 127.0.0.1 and reach it through an SSH tunnel or a VPN."
)


def check_address(host: str, trusted_network: bool) -> None:
    if is_loopback(host) or trusted_network:
        return
    raise BadRequest(f"not listening on {host} without --trusted-network. {NETWORK_WARNING}")


def start_rpc_child(host: str, port: int, threads: int | None, devices: list[str]) -> tuple[subprocess.Popen,
                                                                                         list[str]]:
    command = [sys.executable, "-m", "bridge.devices.rpc_server", "--host", host, "--port", str(port)]
    if threads:
        command += ["--threads", str(threads)]
    for name in devices:
        command += ["--device", name]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    first = child.stdout.readline() if child.stdout else ""
    if not first.startswith("serving "):
        child.kill()
        raise BadRequest(f"llama.cpp's RPC server did not start: {first.strip() or 'no output'}")
    served = first[len("serving "):].rsplit(" on ", 1)[0].split(", ")
    return child, served


def info_app(rpc_port: int, served: list[str], memory_mib: int | None) -> web.Application:
    async def worker_info(_request: web.Request) -> web.Response:
        info = await asyncio.to_thread(local_info, rpc_port, served, memory_mib)
        return web.json_response(info.to_dict())

    app = web.Application()
    app.router.add_get(INFO_PATH, worker_info)
    return app


async def run(host: str, port: int, threads: int | None, devices: list[str], memory_mib: int | None) -> int:
    child, served = start_rpc_child(host, port, threads, devices)
    runner = web.AppRunner(info_app(port, served, memory_mib), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, info_port(port)).start()
        print(f"worker ready: llama.cpp RPC on {host}:{port} ({', '.join(served)}), "
              f"info on http://{host}:{info_port(port)}{INFO_PATH}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if sys.platform != "win32":  # on Windows Ctrl+C raises KeyboardInterrupt, which ends the run too
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        while not stop.is_set() and child.poll() is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        return 0 if child.poll() is None else 1
    finally:
        await runner.cleanup()
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()


def main(args: Any) -> int:
    check_address(args.host, args.trusted_network)
    if not is_loopback(args.host):
        print(f"warning: {NETWORK_WARNING}", file=sys.stderr)
    return asyncio.run(run(args.host, args.port, args.threads, args.device or [], args.memory))


def add_arguments(p: Any) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"llama.cpp RPC port (default {DEFAULT_PORT}); the info endpoint is on the next port")
    p.add_argument("--threads", type=int, help="CPU threads for a CPU worker (default: half the cores)")
    p.add_argument("--device", action="append",
                   help="a llama.cpp device to serve (repeat; default: the GPUs, else the CPU)")
    p.add_argument("--memory", type=int, metavar="MIB", help="lend at most this much memory (MiB)")
    p.add_argument("--trusted-network", action="store_true",
                   help="allow an address other than 127.0.0.1 (the RPC protocol has no authentication)")
