"""Every command survives a Windows console code page with its output piped (issue 16).

Python on Windows writes a piped or redirected stdout in the ANSI code page (cp1252 in the West, cp932 in
Japan) and raises on a character the page lacks. `PYTHONIOENCODING` reproduces that here: each command runs
in a child process with its output in a pipe, under cp1252 and under cp932, in folders whose names neither
page can write whole. Readable output must come out in the page's encoding, `--json` as UTF-8 that
parses, with the paths exact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.sparse_models import write_small_gguf
from tests.test_extension_install import fake_sillytavern

ROOT = Path(__file__).resolve().parent.parent
ENCODINGS = ("cp1252", "cp932")
# Neither code page holds all of these: "é" is not in cp932, "日本" not in cp1252, "·" in neither.
ODD_NAME = "modèles·日本"
REPO = "owner/Small-GGUF"


@dataclass
class Stage:
    tmp: Path
    models: Path
    data: Path
    gguf: Path
    st_dir: Path
    busy_port: int


@pytest.fixture
def stage(tmp_path: Path, fake_hub, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / ODD_NAME
    models = root / "models"
    (models / "owner" / "Small-GGUF").mkdir(parents=True)
    gguf = write_small_gguf(models / "owner" / "Small-GGUF" / "small-Q8_0.gguf")
    fake_hub.add_file(REPO, "small-Q4_0.gguf", gguf.read_bytes(), tmp_dir=tmp_path / "hub")
    monkeypatch.setenv("ST_BRIDGE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield Stage(root, models, root / "data", gguf, fake_sillytavern(root / "SillyTavern"),
                    busy.getsockname()[1])


def commands(s: Stage) -> list[list[str]]:
    """Every subcommand, with --json where it has one; `serve` meets a busy port and exits."""
    listed = [
        ["hardware"],
        ["inspect", str(s.models)],
        ["fit", str(s.gguf), "--ctx", "512"],
        ["recommend", "--data-dir", str(s.data), "--limit", "3"],
        ["catalog", "--data-dir", str(s.data)],
        ["models", "--models-dir", str(s.models)],
    ]
    return [
        *listed,
        *[[*command, "--json"] for command in listed],
        ["catalog", "refresh", "--repo", REPO, "--no-discover", "--data-dir", str(s.tmp / "refreshed")],
        ["pull", REPO, "--file", "small-Q4_0.gguf", "--models-dir", str(s.models)],
        ["models", "--delete", f"{REPO}/small-Q4_0", "--models-dir", str(s.models)],
        ["install-extension", str(s.st_dir), "--data-root", str(s.tmp / "st-data")],
        ["serve", "--port", str(s.busy_port), "--models-dir", str(s.models), "--data-dir", str(s.data)],
    ]


def run(args: list[str], encoding: str) -> subprocess.CompletedProcess[bytes]:
    env = os.environ | {"PYTHONIOENCODING": encoding, "PYTHONUTF8": "0"}
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True, env=env, cwd=ROOT,
                          timeout=120)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_command_survives_the_code_page(stage: Stage, encoding: str) -> None:
    failures = []
    for args in commands(stage):
        proc = run(args, encoding)
        problem = _problem(args, proc, encoding, stage)
        if problem:
            failures.append(f"st-bridge {' '.join(args[:2])}: {problem}")
    assert not failures, "\n".join(failures)


def _problem(args: list[str], proc: subprocess.CompletedProcess[bytes], encoding: str, s: Stage) -> str:
    err = proc.stderr.decode(encoding, errors="replace")
    if "Traceback" in err or "UnicodeEncodeError" in err:
        return f"crashed: {err[-600:]}"
    if args[0] == "serve":
        last = err.strip().splitlines()[-1] if err.strip() else ""
        expected = f"error: port {s.busy_port} is already in use"
        return "" if proc.returncode == 2 and last.startswith(expected) else f"exit {proc.returncode}: {last}"
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {err[-600:]}"
    if "--json" in args:
        return _json_problem(args, proc.stdout, s)
    try:
        proc.stdout.decode(encoding)
    except UnicodeDecodeError as exc:
        return f"readable output is not {encoding}: {exc}"
    return ""


def _json_problem(args: list[str], out: bytes, s: Stage) -> str:
    try:
        data = json.loads(out.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"--json is not UTF-8 JSON: {exc}"
    text = json.dumps(data, ensure_ascii=False)
    if args[0] in ("inspect", "models") and str(s.models) not in text:
        return f"the path {s.models} did not come through exactly"
    return ""
