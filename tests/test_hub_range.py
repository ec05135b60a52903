"""A GGUF header read on the Hub by range requests gives the planner the same input as the local file."""

from __future__ import annotations

from dataclasses import asdict

from bridge import fit, gguf
from bridge.hub import HubClient

REPO = "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"
FILE = "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"


def test_remote_header_matches_local_and_reads_under_2_percent(fake_hub, llama8b_path):
    fake_hub.add_file(REPO, FILE, llama8b_path, sha256="0" * 64)  # a sparse 8B file: never hashed, never sent
    local = gguf.read_file(llama8b_path)

    remote = HubClient(endpoint=fake_hub.endpoint).read_header(REPO, [FILE])

    assert asdict(gguf.model_info(remote)) == asdict(gguf.model_info(local))
    assert remote.tensors == local.tensors
    assert fit.ModelLayout.from_header(remote) == fit.ModelLayout.from_header(local)
    served = fake_hub.served(REPO, FILE)
    size = llama8b_path.stat().st_size
    assert size > 4e9 and 0 < served < 0.02 * size
    assert all(r is not None for m, _, r in fake_hub.requests if m == "GET")  # only Range requests


def test_files_lists_exact_sizes_and_sha256(fake_hub, tmp_path):
    fake_hub.add_file("a/b-GGUF", "b.Q4_K_M.gguf", b"GGUF" + b"x" * 1000, tmp_dir=tmp_path)
    files = HubClient(endpoint=fake_hub.endpoint).files("a/b-GGUF")
    assert [(f.path, f.size) for f in files] == [("b.Q4_K_M.gguf", 1004)]
    assert files[0].sha256 == fake_hub.file("a/b-GGUF", "b.Q4_K_M.gguf").sha256
