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

from .console import prepare_streams, write_json
from .errors import BridgeError, Conflict


def _print_json(data: Any) -> None:
    write_json(data)


# --- hardware ----------------------------------------------------------------------------------------

def _add_worker_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", action="append", dest="workers", metavar="HOST:PORT",
                   help="count an `st-bridge worker` on another machine too (repeat)")


def _use_workers(args: argparse.Namespace) -> None:
    """`--worker HOST:PORT`: those workers' devices count as offload devices (each is checked now)."""
    addresses = getattr(args, "workers", None) or []
    if not addresses:
        return
    from .workers.registry import registry

    registry.configure([], addresses)
    for remote in registry.refresh():
        if remote.state != "ready":
            print(f"note: {remote.message}", file=sys.stderr)


def _add_hardware(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hardware", help="show CPU, RAM and GPUs, and whether this build can use the GPU")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_worker_flag(p)


def _run_hardware(args: argparse.Namespace) -> int:
    from . import hardware

    _use_workers(args)
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
    from .formats import identify  # imported here so other subcommands start without it

    found = identify(args.path)  # a missing path raises NotFound: exit 2 with its message
    if args.json:
        _print_json([item.to_dict() for item in found])
        return 0
    if not found:
        print(f"no model files in {args.path}")
        return 0
    print(_inspect_table(found))
    return 0  # unrunnable files are an answer, not an error


def _inspect_table(found: list[Any]) -> str:
    """One row per model (GGUF details where known), its explanation indented beneath it."""
    header = ("FILE", "KIND", "RUNS", "ARCH", "PARAMS", "LAYERS", "CTX", "QUANT", "SIZE")
    rows = []
    for item in found:
        info = item.info
        rows.append((
            _short_path(item.path, item.files), item.kind, "yes" if item.runnable else "no",
            info.architecture if info else "-",
            f"{info.n_params / 1e9:.1f}B" if info else "-",
            str(info.n_layer) if info else "-",
            str(info.n_ctx_train) if info else "-",
            item.quant or "-",
            _human_size(item.size_bytes),
        ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(col.ljust(w) for col, w in zip(header, widths, strict=True)).rstrip()]
    for item, row in zip(found, rows, strict=True):
        lines.append("  ".join(col.ljust(w) for col, w in zip(row, widths, strict=True)).rstrip())
        lines.append(f"    {item.explanation}")
    return "\n".join(lines)


def _short_path(path: str, files: list[str]) -> str:
    from pathlib import Path

    name = Path(path).name
    return f"{name} (+{len(files) - 1} parts)" if len(files) > 1 else name


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --- fit ---------------------------------------------------------------------------------------------

def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="plan how a GGUF model runs on this machine (or a what-if machine)")
    _add_worker_flag(p)
    p.add_argument("file", help="a local GGUF file")
    p.add_argument("--ctx", type=int, help="context in tokens (default 8192, or the model's own if smaller)")
    p.add_argument("--ubatch", type=int, default=512, help="physical batch size (default 512)")
    p.add_argument("--kv-type", choices=["f16", "q8_0", "q4_0"],
                   help="KV cache type (default: f16, or q8_0 when only that makes the model fit)")
    p.add_argument("--kv-type-k", choices=["f16", "q8_0", "q4_0"], help="K cache type alone")
    p.add_argument("--kv-type-v", choices=["f16", "q8_0", "q4_0"], help="V cache type alone")
    p.add_argument("--flash-attn", choices=["on", "off", "auto"], default="auto", help="flash attention")
    p.add_argument("--gpu-layers", type=_gpu_layers, default=None, metavar="N|auto",
                   help="layers on the GPU, the output layer counting as one (default: the most that fit)")
    moe = p.add_mutually_exclusive_group()
    moe.add_argument("--cpu-moe", action="store_true", help="keep every MoE expert in RAM")
    moe.add_argument("--n-cpu-moe", type=int, metavar="N", help="keep the first N layers' experts in RAM")
    p.add_argument("--gpu-mib", type=int, action="append", metavar="M",
                   help="what if a GPU had this much free MiB (repeat per GPU; 0: no GPU)")
    p.add_argument("--ram-mib", type=int, metavar="M", help="what if this much RAM were available")
    p.add_argument("--exact", action="store_true",
                   help="measure with llama.cpp itself (a dry run that allocates nothing)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _gpu_layers(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the number of GPU layers cannot be negative")
    return value


def _run_fit(args: argparse.Namespace) -> int:
    from .fit import FitParams, plan
    from .gguf import read_file

    header = read_file(args.file)
    params = FitParams(
        n_ctx=args.ctx, n_ubatch=args.ubatch, kv_type_k=args.kv_type_k or args.kv_type,
        kv_type_v=args.kv_type_v or args.kv_type, flash_attn=args.flash_attn, gpu_layers=args.gpu_layers,
        cpu_moe=args.cpu_moe, n_cpu_moe=args.n_cpu_moe or 0,
    )
    machine = _machine(args)
    result = plan(header, machine, params)
    if args.exact:
        from .fit_exact import refine

        result = refine(result, args.file)
    if args.json:
        _print_json(result.to_dict())
        return 0
    _print_fit(result.to_dict())
    return 0


def _print_fit(data: dict[str, Any]) -> None:
    ngl = f"{data['gpu_layers']} of {data['n_layer'] + 1} layers on the GPU"
    if data["n_cpu_moe"]:
        ngl += f", experts of {data['n_cpu_moe']} layers in RAM"
    fa = "on" if data["flash_attn"] else "off"
    print(f"{data['model']}: {ngl} · {data['n_ctx']} tokens · KV {data['kv_type']} · flash attention {fa}")
    print(f"\n{'MiB':8}{'weights':>10}{'KV':>10}{'compute':>10}{'overhead':>10}{'total':>10}{'free':>10}")
    for d in data["devices"]:
        free = d.get("free_mib", d.get("available_mib", ""))
        cols = [d["weights_mib"], d["kv_mib"], d["compute_mib"], d["overhead_mib"], d["total_mib"], free]
        print(f"{d['name']:8}" + "".join(f"{c:>10}" for c in cols))
    host = data["devices"][-1]
    print(f"\nRAM: needs {host['resident_mib'] / 1024:.2f} GB resident (repacked weights "
          f"{host['repack_mib']:.0f} MiB); reads the {host['file_read_mib'] / 1024:.2f} GB file once "
          "while loading")
    full, most = data["max_ctx_full_gpu"] or "-", data["max_ctx"] or "-"
    print(f"largest context fully on the GPU: {full} · largest that runs: {most} · figures: {data['mode']}")
    for note in data["notes"]:
        print(f"note: {note}")
    print(f"\n{data['verdict']}: {data['reason']}")


# --- install-extension -------------------------------------------------------------------------------

def _add_install_extension(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install-extension", help="install the SillyTavern extension into a SillyTavern")
    p.add_argument("st_dir", metavar="ST_DIR", help="the SillyTavern folder (the one with server.js)")
    p.add_argument("--user", default="default-user", help="SillyTavern user to install for (default-user)")
    p.add_argument("--data-root", help="SillyTavern's data folder when it is not ST_DIR/data (e.g. Docker)")


def _run_install_extension(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .extension_install import install_extension, next_steps

    data_dir = Path(args.data_root).expanduser() if args.data_root else None
    result = install_extension(Path(args.st_dir), user=args.user, data_dir=data_dir)
    print(next_steps(result))
    return 0


# --- serve -------------------------------------------------------------------------------------------

def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model to SillyTavern (KoboldCpp, llama.cpp and ooba APIs)")
    p.add_argument("--model", help="a GGUF file, or a model id in the models dir (default: the last used)")
    p.add_argument("--models-dir", help="folder of GGUF models (default: the platform's data dir)")
    p.add_argument("--data-dir", help="where the bridge keeps its state and, by default, its models")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; beyond loopback needs --api-key)")
    p.add_argument("--port", type=int, help="port (default 5001, KoboldCpp's)")
    p.add_argument("--ctx", type=int, help="context length (default: chosen by the planner)")
    p.add_argument("--gpu-layers", type=int, help="layers on the GPU (default: chosen by the planner)")
    p.add_argument("--kv-type", choices=["f16", "q8_0", "q4_0"], help="KV cache type")
    p.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, help="flash attention on or off")
    p.add_argument("--api-key", help="require `Authorization: Bearer <key>` (ST's API key field)")
    p.add_argument("--allowed-origin", action="append", dest="allowed_origins", metavar="ORIGIN",
                   help="a browser origin allowed besides this machine's own pages (repeat), e.g. "
                        "http://192.168.1.20:8000, or http://st.lan:* for any port")
    p.add_argument("--allowed-host", action="append", dest="allowed_hosts", metavar="NAME",
                   help="another name of this machine for the Host check (repeat); its own host name "
                        "and interface addresses always count")
    p.add_argument("--docker", action="store_true", default=None,
                   help="also listen on Docker's bridge gateway (Linux) so SillyTavern in a container "
                        "reaches the bridge at host.docker.internal; answers only containers")
    p.add_argument("--max-queue", type=int, help="generations that may wait before 503 (default 16)")
    p.add_argument("--rpc", action="append", dest="rpc_servers", metavar="HOST:PORT",
                   help="a llama.cpp RPC server whose device may hold layers (repeat; see the README)")
    p.add_argument("--worker", action="append", dest="workers", metavar="HOST:PORT",
                   help="an `st-bridge worker` on another machine (repeat; see the README)")
    p.add_argument("--embedding-model", help="an embedding GGUF for SillyTavern's Vector Storage (file or "
                   "model id; default: the one used last)")
    p.add_argument("--embedding-ctx", type=int,
                   help="tokens an embedding model reads per text (default 2048)")
    p.add_argument("--vision", action=argparse.BooleanOptionalAction,
                   help="load the vision projector (mmproj) found beside a model (default on)")


def _run_serve(args: argparse.Namespace) -> int:
    from .api.app import serve
    from .config import load_settings

    names = ("model", "models_dir", "data_dir", "host", "port", "ctx", "gpu_layers", "kv_type", "flash_attn",
             "api_key", "allowed_origins", "allowed_hosts", "docker", "max_queue", "rpc_servers",
             "workers", "embedding_model", "embedding_ctx", "vision")
    flags = {name: getattr(args, name) for name in names}
    serve(load_settings(**flags))
    return 0


# --- recommend ---------------------------------------------------------------------------------------

def _add_recommend(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="the biggest, least-quantized catalog model that fits this machine")
    _add_worker_flag(p)
    p.add_argument("--ctx", type=int, default=8192, help="context the model must hold (default 8192)")
    p.add_argument("--gpu-mib", type=int, action="append",
                   help="what if a GPU had this much free MiB (repeat per GPU; 0: no GPU)")
    p.add_argument("--ram-mib", type=int,
                   help="what if the machine had this much RAM (MiB; a desktop reserve is kept out of it)")
    p.add_argument("--limit", type=int, default=8, help="how many models to list (default 8)")
    p.add_argument("--data-dir", help="where the refreshed catalog is cached")
    p.add_argument("--json", action="store_true", help="print JSON")


def _machine(args: argparse.Namespace) -> Any:
    from .hardware import probe, what_if

    _use_workers(args)
    report = probe()
    if args.gpu_mib is not None or args.ram_mib is not None:
        report = what_if(report, args.gpu_mib, args.ram_mib)
    return report


def _catalog(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from . import catalog
    from .config import load_settings

    data_dir = Path(args.data_dir) if getattr(args, "data_dir", None) else load_settings().data_dir
    return catalog.load(data_dir)


def _cpu_speed(args: argparse.Namespace, machine: Any) -> Any:
    """This machine's CPU figures: measured once on the first recommendation (a few seconds), then kept."""
    from pathlib import Path

    from .calibrate import cached, cpu_speed
    from .config import load_settings

    settings = load_settings()
    data_dir = Path(args.data_dir) if getattr(args, "data_dir", None) else settings.data_dir
    if settings.speed_probe and machine.llama_cpp_version and cached(data_dir, machine) is None:
        print("measuring this machine's speed once (a few seconds) ...", file=sys.stderr, flush=True)
    return cpu_speed(data_dir, machine, measure_missing=settings.speed_probe)


def _run_recommend(args: argparse.Namespace) -> int:
    from .hardware import probe
    from .recommend import recommend, what_if_machine
    from .speed import describe_wait

    _use_workers(args)
    machine = probe()
    if args.gpu_mib is not None or args.ram_mib is not None:
        machine = what_if_machine(machine, args.gpu_mib, args.ram_mib)
    rec = recommend(_catalog(args), machine, n_ctx=args.ctx, limit=args.limit, cpu=_cpu_speed(args, machine))
    if args.json:
        _print_json(rec.to_dict())
        return 0
    for c in rec.candidates:
        size = f"{c.size_mib / 1024:5.1f} GiB"
        wait = describe_wait(c.first_reply_s)
        print(f"[{c.badge:^7}] {c.repo:48} {c.quant:8} {size} ~{c.expected_tok_s:4.0f} tok/s  "
              f"first reply {wait:>7}  ctx {c.n_ctx}")
    if rec.best:
        print(f"\n{rec.best.reason}\nst-bridge pull {rec.best.repo} --file {rec.best.file}")
    else:
        print("nothing in the catalog runs well here; try a smaller --ctx")
    print(f"({len(rec.left_out)} files left out; --json lists each with its reason)")
    return 0


# --- pull --------------------------------------------------------------------------------------------

def _add_pull(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a GGUF model from Hugging Face into the models dir")
    p.add_argument("repo", help="a Hugging Face repository, e.g. brittlewis12/Kunoichi-DPO-v2-7B-GGUF")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quant", help="the quant to fetch, e.g. Q5_K_M (default: the best that fits)")
    which.add_argument("--file", help="the file to fetch (its sibling shards come along)")
    p.add_argument("--ctx", type=int, default=8192, help="context used to choose the quant (default 8192)")
    p.add_argument("--models-dir", help="where models go (default: the platform's data dir)")
    p.add_argument("--load", action="store_true", help="load it into the bridge running here when done")
    p.add_argument("--port", type=int, help="the running bridge's port, for --load (default: the config's)")


def _run_pull(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import load_settings
    from .downloads import DownloadManager
    from .recommend import best_quant, quants

    settings = load_settings(models_dir=args.models_dir, port=args.port)
    quant, file = args.quant, args.file
    if not quant and not file:
        best = best_quant(quants(_catalog(args), args.repo, _machine_plain(), n_ctx=args.ctx))
        if best is None:
            raise BridgeError(f"no quant of {args.repo} runs well on this machine at {args.ctx} tokens; "
                              "name one with --quant")
        file = best.file
    bar = _ProgressLine()
    dl = DownloadManager(Path(settings.models_path), on_event=bar).pull(args.repo, quant=quant, file=file)
    print(f"\n{dl.path}")
    if args.load:
        _load_into_running_bridge(settings, dl.path)
    return 0


def _machine_plain() -> Any:
    from .hardware import probe

    return probe()


class _ProgressLine:
    """One self-rewriting line: bytes, rate and time left."""

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        total, done = data["bytes_total"] or 1, data["bytes_done"]
        eta = f"{data['eta_s']:.0f}s left" if data.get("eta_s") is not None else ""
        state = data["state"] if data["state"] != "running" else f"{done / total:6.1%}"
        rate = data["rate_bps"] / 1e6
        sys.stderr.write(f"\r{state} {done / 1e9:6.2f}/{total / 1e9:.2f} GB {rate:7.1f} MB/s {eta:12}")
        sys.stderr.flush()


def _load_into_running_bridge(settings: Any, path: Any) -> None:
    """Ask the bridge on this machine (the settings' port) to load the new model, or say how to serve it."""
    from pathlib import Path

    from .library import model_id

    base, serve_it = f"http://127.0.0.1:{settings.port}", f"st-bridge serve --model {path}"
    try:
        status = _call_bridge(settings, f"{base}/bridge/v1/status")
    except _NoBridge:
        print(f"no bridge answers on 127.0.0.1:{settings.port}, so nothing was loaded; serve it with:\n"
              f"  {serve_it}")
        return
    served = Path(status["models_dir"]).resolve()
    if not Path(path).resolve().is_relative_to(served):
        # The bridge loads only models in its own folder (ids, never paths, over HTTP).
        print(f"the bridge on port {settings.port} serves models from {served}, not from where this one is; "
              f"pull with --models-dir {served}, or restart it with:\n  {serve_it}")
        return
    model = model_id(Path(path).resolve(), served)
    print(f"loading {model} into the bridge on port {settings.port} ...", file=sys.stderr)
    reply = _call_bridge(settings, f"{base}/bridge/v1/load", {"model": model})
    n_ctx = (reply.get("plan") or {}).get("n_ctx", "?")
    print(f"loaded {reply.get('model') or model} into the bridge on port {settings.port} ({n_ctx} tokens)")


class _NoBridge(Exception):
    """Nothing listens on the bridge's port."""


def _call_bridge(settings: Any, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET (or POST `body` as JSON to) a local bridge; its error message becomes a BridgeError."""
    import urllib.error
    import urllib.request

    headers = {"Accept": "application/json"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    data = None
    if body is not None:
        # No Origin header: the bridge refuses only browser origins it does not know; Host is 127.0.0.1.
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        # A load reads the whole model from disk: minutes for a big one.
        with urllib.request.urlopen(request, timeout=900) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise BridgeError(f"the bridge on port {settings.port} answered {exc.code}: {_bridge_error(exc)}") \
            from exc
    except (urllib.error.URLError, ConnectionError) as exc:
        raise _NoBridge(str(exc)) from exc


def _bridge_error(exc: Any) -> str:
    try:
        error = json.loads(exc.read()).get("error")
    except ValueError:
        return str(exc.reason)
    return error.get("message", str(error)) if isinstance(error, dict) else str(error or exc.reason)


# --- catalog -----------------------------------------------------------------------------------------

def _add_catalog(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("catalog", help="list the model catalog, or refresh it from Hugging Face")
    p.add_argument("action", nargs="?", choices=["list", "refresh"], default="list")
    p.add_argument("--repo", action="append", help="refresh only this repository (repeat)")
    p.add_argument("--author", action="append",
                   help="add GGUF repositories of this uploader (repeat; default: trusted_uploaders)")
    p.add_argument("--no-discover", action="store_true", help="add no repositories, refresh the known ones")
    p.add_argument("--no-headers", action="store_true", help="refresh sizes and sha256 only")
    p.add_argument("--data-dir", help="where the refreshed catalog is cached")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_catalog(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import catalog
    from .config import load_settings
    from .hub import HubClient

    cat = _catalog(args)
    if args.action == "refresh":
        settings = load_settings(data_dir=args.data_dir)
        authors = [] if args.no_discover or args.repo else args.author or settings.trusted_uploaders
        cat, changed = catalog.refresh_cache(
            Path(settings.data_dir), HubClient(), authors=authors, read_headers=not args.no_headers,
            repos=args.repo, log=lambda m: print(m, file=sys.stderr),
        )
        state = "updated" if changed else "unchanged"
        print(f"catalog {state}, saved in {Path(settings.data_dir) / catalog.CACHE_NAME}", file=sys.stderr)
    if args.json:
        _print_json(cat.to_dict())
        return 0
    for m in cat.models:
        est = " (estimated)" if m.params_estimated else ""
        found = "  [discovered]" if m.source == "discovered" else ""
        print(f"{m.repo:48} {m.params_b:g}B{est}  {', '.join(f.quant for f in m.files)}{found}")
    print(f"\n{len(cat.models)} models, catalog: {cat.origin}")
    return 0


# --- models ------------------------------------------------------------------------------------------

def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the downloaded models, or delete one")
    p.add_argument("--delete", metavar="ID", help="delete this model (all its shards)")
    p.add_argument("--models-dir", help="where models are (default: the platform's data dir)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import library
    from .config import load_settings
    from .downloads import DownloadManager

    settings = load_settings(models_dir=args.models_dir)
    root = Path(settings.models_path)
    if args.delete:
        found = library.resolve(root, args.delete)
        _refuse_if_served(settings, found.path)
        for p in DownloadManager(root).delete(found.path):
            print(f"deleted {p}")
        return 0
    models = library.scan(root)
    if args.json:
        _print_json([{"id": m.id, "path": str(m.path), "size_bytes": m.size_bytes} for m in models])
        return 0
    for m in models:
        print(f"{m.id:70} {m.size_bytes / 2**30:6.2f} GiB")
    print(f"\n{len(models)} models in {root}")
    return 0


def _refuse_if_served(settings: Any, path: Any) -> None:
    """The bridge on this machine serves this model: refuse, as its own DELETE route does (on Windows the
    file could not go anyway; elsewhere it would vanish under the running model)."""
    from pathlib import Path

    try:
        status = _call_bridge(settings, f"http://127.0.0.1:{settings.port}/bridge/v1/status")
    except (_NoBridge, BridgeError):  # none runs, or one that is not ours to ask: nothing to protect
        return
    served = status.get("model_path")
    if served and Path(served).resolve() == Path(path).resolve():
        raise Conflict(f"the bridge on port {settings.port} is serving {status.get('model') or path}: "
                       "unload it first (Unload in the panel, or POST /bridge/v1/unload), then delete it")


# --- main --------------------------------------------------------------------------------------------

Adder = Callable[[argparse._SubParsersAction], None]
Runner = Callable[[argparse.Namespace], int]
def _add_worker(sub: argparse._SubParsersAction) -> None:
    from .workers import serve

    p = sub.add_parser("worker", help="lend this machine's GPU or CPU to a bridge on another machine (RPC)")
    serve.add_arguments(p)


def _run_worker(args: argparse.Namespace) -> int:
    from .workers import serve

    return serve.main(args)


COMMANDS: dict[str, tuple[Adder, Runner]] = {
    "serve": (_add_serve, _run_serve),
    "worker": (_add_worker, _run_worker),
    "hardware": (_add_hardware, _run_hardware),
    "inspect": (_add_inspect, _run_inspect),
    "fit": (_add_fit, _run_fit),
    "install-extension": (_add_install_extension, _run_install_extension),
    "recommend": (_add_recommend, _run_recommend),
    "pull": (_add_pull, _run_pull),
    "catalog": (_add_catalog, _run_catalog),
    "models": (_add_models, _run_models),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-bridge", description="Run local GGUF models for SillyTavern.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    prepare_streams()
    args = build_parser().parse_args(argv)
    _, run = COMMANDS[args.command]
    try:
        return run(args)
    except BridgeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
