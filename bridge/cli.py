"""The `st-bridge` command line: one subcommand per capability.

Each subcommand has a `_add_<name>` function that declares its flags and a `_run_<name>` function that
calls plain library code and prints the result (a readable table, or JSON with `--json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import BridgeError


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str, ensure_ascii=False))


# --- hardware ----------------------------------------------------------------------------------------

def _add_hardware(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hardware", help="show CPU, RAM and GPUs, and whether this build can use the GPU")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_hardware(args: argparse.Namespace) -> int:
    from . import hardware

    report = hardware.probe()
    if args.json:
        _print_json(hardware.report_to_dict(report))
        return 0
    print("\n".join(hardware.report_lines(report)))
    return 0


# --- inspect -----------------------------------------------------------------------------------------

def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="say what a model file (or every file in a folder) is")
    p.add_argument("path", help="a file or a folder")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_inspect(args: argparse.Namespace) -> int:
    raise BridgeError("`inspect` is not available in this build yet")


# --- fit ---------------------------------------------------------------------------------------------

def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="plan how a GGUF model runs on this machine (or a what-if machine)")
    p.add_argument("file", help="a local GGUF file")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_fit(args: argparse.Namespace) -> int:
    raise BridgeError("`fit` is not available in this build yet")


# --- main --------------------------------------------------------------------------------------------

Adder = Callable[[argparse._SubParsersAction], None]
Runner = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Adder, Runner]] = {
    "hardware": (_add_hardware, _run_hardware),
    "inspect": (_add_inspect, _run_inspect),
    "fit": (_add_fit, _run_fit),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-bridge", description="Run local GGUF models for SillyTavern.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, run = COMMANDS[args.command]
    try:
        return run(args)
    except BridgeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
