"""llama.cpp's RPC server, started from the llama-cpp-python this bridge runs: the process becomes an
offload device for a bridge on another machine, or on this one (tests, `../README` "Building with RPC").

    python -m bridge.devices.rpc_server --host 127.0.0.1 --port 50052 [--threads N] [--device CPU]

Both ends run the same libggml-rpc, so they always speak the same protocol version. The protocol has no
authentication and has had remote-crash bugs: it listens on 127.0.0.1 unless `--host` says otherwise.
It serves one client at a time and blocks until the process is stopped.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from . import ggml

DEFAULT_PORT = 50052


def serving_devices(requested: list[str]) -> list[str]:
    """The devices to serve: those named, else every GPU, else the CPU (llama.cpp's rpc-server rule)."""
    if requested:
        return requested
    found = ggml.devices()
    gpus = [d.name for d in found if d.offloads and not d.is_rpc]
    return gpus or [next(d.name for d in found if d.kind == "cpu")]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.devices.rpc_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--device", action="append", default=[], help="a llama.cpp device name (repeat)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    try:
        names = serving_devices(args.device)
        if not is_loopback(args.host):
            print(f"warning: serving llama.cpp's RPC protocol on {args.host}: it has no authentication; "
                  "use it only on a trusted network, a VPN or an SSH tunnel", file=sys.stderr)
        print(f"serving {', '.join(names)} on {args.host}:{args.port}", flush=True)
        ggml.start_rpc_server(f"{args.host}:{args.port}", args.threads, names, args.cache_dir)
    except (ggml.RPCUnavailable, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
