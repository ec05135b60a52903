"""`st-bridge inspect PATH [--json]`: a table by default, JSON on request, exit 0 even for files it
cannot run, exit 2 with a clear message for a missing path."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

from bridge.cli import main
from tests.fixtures.sparse_models import write_small_gguf
from tests.test_formats import Trap, hf_folder


def test_table_for_a_gguf(llama8b_path, capsys):
    assert main(["inspect", str(llama8b_path)]) == 0
    out = capsys.readouterr().out
    header, row, explanation = out.splitlines()[:3]
    for column in ("FILE", "KIND", "RUNS", "ARCH", "PARAMS", "LAYERS", "CTX", "QUANT", "SIZE"):
        assert column in header
    assert row.split() == ["llama31-8b.gguf", "gguf", "yes", "llama", "8.0B", "32", "131072", "Q4_K_M", "4.3",
                           "GiB"]
    assert explanation.startswith("    GGUF model")


def test_folder_with_unrunnable_files_exits_0(tmp_path, capsys):
    write_small_gguf(tmp_path / "chat-1B.Q8_0.gguf")
    hf_folder(tmp_path, "Mistral-7B-AWQ", {"quant_method": "awq", "bits": 4})
    (tmp_path / "old.bin").write_bytes(pickle.dumps(Trap(tmp_path / "marker"), protocol=2))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "AWQ 4-bit safetensors" in out and "unsafe" in out and "GGUF model" in out
    assert not (tmp_path / "marker").exists()


def test_json_is_a_list_of_objects(tmp_path, capsys):
    write_small_gguf(tmp_path / "a.gguf")
    write_small_gguf(tmp_path / "mmproj-a.gguf", "clip")
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(d["kind"] for d in data) == ["gguf", "mmproj"]
    gguf_entry = next(d for d in data if d["kind"] == "gguf")
    assert gguf_entry["runnable"] is True and gguf_entry["info"]["n_layer"] == 2
    assert {"path", "explanation", "files", "size_bytes", "unsafe", "quant", "name_hints"} <= set(gguf_entry)


def test_empty_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 0
    assert "no model files" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_missing_path_exits_2_with_a_message():
    missing = Path("/nonexistent/model.gguf")
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "inspect", str(missing)], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 2
    assert f"no such file or folder: {missing}" in proc.stderr
