"""Downloads with the real huggingface_hub client against the fake Hub: progress, resume, sha256, cancel."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from bridge.downloads import DownloadManager
from bridge.errors import ModelFileError, NotEnoughDisk
from bridge.hub import HubClient

REPO = "brittlewis12/Kunoichi-DPO-v2-7B-GGUF"
FILE = "kunoichi-dpo-v2-7b.Q6_K.gguf"
SIZE = 6 << 20


@pytest.fixture
def model_bytes() -> bytes:
    # Random bytes: a resume that wrote at the wrong offset would change the sha256.
    return b"GGUF" + os.urandom(SIZE - 4)


@pytest.fixture
def hub_with_model(fake_hub, tmp_path, model_bytes):
    fake_hub.add_file(REPO, FILE, model_bytes, tmp_dir=tmp_path / "hub")
    fake_hub.add_file(REPO, "README.md", b"# card", lfs=False, tmp_dir=tmp_path / "hub")
    return fake_hub


@pytest.fixture(autouse=True)
def small_read_chunks(monkeypatch):
    # huggingface_hub hands progress over per 10 MiB read; these test files are a few MiB.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256 << 10)


def manager(hub, tmp_path: Path, **kw) -> DownloadManager:
    return DownloadManager(
        tmp_path / "models", HubClient(endpoint=hub.endpoint), hf_cache_dir=tmp_path / "hf-cache", **kw
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_reports_progress_and_verifies(hub_with_model, tmp_path, model_bytes):
    events: list[tuple[str, dict]] = []
    hub_with_model.throttle_bps = 10 << 20
    dl = manager(hub_with_model, tmp_path, on_event=lambda n, d: events.append((n, d))).pull(
        REPO, quant="Q6_K"
    )
    assert dl.path == tmp_path / "models" / REPO / FILE
    assert dl.path.read_bytes() == model_bytes
    progress = [d for n, d in events if n == "download_progress"]
    assert progress and progress[0]["bytes_total"] == SIZE
    assert any(0 < d["bytes_done"] < SIZE and d["rate_bps"] > 0 and d["eta_s"] is not None for d in progress)
    assert events[-1][0] == "download_done"


def test_interrupted_download_resumes_from_where_it_stopped(hub_with_model, tmp_path, model_bytes):
    from tests.fixtures.hub import Misbehaviour

    key = f"{REPO}/{FILE}"
    hub_with_model.misbehave[key] = Misbehaviour(pause_after=SIZE // 2)
    mgr = manager(hub_with_model, tmp_path)
    dl = mgr.submit(REPO, quant="Q6_K")
    assert hub_with_model.misbehave[key].paused.wait(10)
    # The connection drops half-way and the Hub stays down: the pull gives up and keeps what it has.
    bad = hub_with_model.misbehave[key]
    bad.cut_after, bad.refuse = SIZE // 2, True
    bad.resume.set()
    assert mgr.wait(dl.id, 20).state == "failed"
    assert "resume" in dl.error
    assert dl.dest[0].with_name(FILE + ".incomplete").stat().st_size == SIZE // 2
    first_run = hub_with_model.served(REPO, FILE)

    hub_with_model.misbehave.pop(key)
    hub_with_model.reset_counts()
    again = manager(hub_with_model, tmp_path).pull(REPO, quant="Q6_K")  # a new manager: a restart
    assert sha(again.path) == hashlib.sha256(model_bytes).hexdigest()
    assert first_run >= SIZE // 2
    assert hub_with_model.served(REPO, FILE) <= SIZE // 2 + (1 << 20)
    assert any(r and r.startswith("bytes=") for _, _, r in hub_with_model.requests)


def test_corrupt_file_fails_sha256_and_is_removed(hub_with_model, tmp_path):
    from tests.fixtures.hub import Misbehaviour

    hub_with_model.misbehave[f"{REPO}/{FILE}"] = Misbehaviour(corrupt=True)
    with pytest.raises(ModelFileError, match="corrupt"):
        manager(hub_with_model, tmp_path).pull(REPO, quant="Q6_K")
    folder = tmp_path / "models" / REPO
    assert not any(p.suffix in (".gguf", ".incomplete") for p in folder.iterdir())


def test_file_larger_than_free_space_is_refused_before_starting(hub_with_model, tmp_path):
    mgr = manager(hub_with_model, tmp_path, free_bytes=lambda _p: SIZE)  # the disk's answer, substituted
    with pytest.raises(NotEnoughDisk, match="GB free"):
        mgr.pull(REPO, quant="Q6_K")
    assert hub_with_model.served(REPO, FILE) == 0


def test_cancel_removes_partial_data(hub_with_model, tmp_path):
    from tests.fixtures.hub import Misbehaviour

    key = f"{REPO}/{FILE}"
    hub_with_model.misbehave[key] = Misbehaviour(pause_after=SIZE // 3)
    mgr = manager(hub_with_model, tmp_path)
    dl = mgr.submit(REPO, quant="Q6_K")
    assert hub_with_model.misbehave[key].paused.wait(10)
    mgr.cancel(dl.id)
    hub_with_model.misbehave[key].resume.set()
    assert mgr.wait(dl.id, 20).state == "cancelled"
    folder = tmp_path / "models" / REPO
    assert not any(p.suffix in (".gguf", ".incomplete") for p in folder.iterdir())


def test_two_pulls_of_the_same_file_do_not_corrupt_it(hub_with_model, tmp_path, model_bytes):
    hub_with_model.throttle_bps = 30 << 20
    results: list[object] = []

    def pull() -> None:
        try:
            results.append(manager(hub_with_model, tmp_path).pull(REPO, quant="Q6_K"))
        except Exception as exc:  # collected, asserted below
            results.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(not isinstance(r, Exception) for r in results), results
    path = tmp_path / "models" / REPO / FILE
    assert path.read_bytes() == model_bytes
    assert hub_with_model.served(REPO, FILE) == SIZE  # the second pull found it done


def test_file_in_the_hf_cache_is_reused(hub_with_model, tmp_path, model_bytes):
    digest = hashlib.sha256(model_bytes).hexdigest()
    blob = tmp_path / "hf-cache" / "models--someone--copy" / "blobs" / digest
    blob.parent.mkdir(parents=True)
    blob.write_bytes(model_bytes)
    dl = manager(hub_with_model, tmp_path).pull(REPO, quant="Q6_K")
    assert dl.reused == [FILE] and dl.path.read_bytes() == model_bytes
    assert hub_with_model.served(REPO, FILE) == 0


def test_split_shards_download_as_one_unit(fake_hub, tmp_path):
    repo = "bartowski/Big-GGUF"
    parts = [f"Big-Q8_0/Big-Q8_0-0000{i}-of-00002.gguf" for i in (1, 2)]
    for p in parts:
        fake_hub.add_file(repo, p, os.urandom(1 << 20), tmp_dir=tmp_path / "hub")
    dl = manager(fake_hub, tmp_path).pull(repo, quant="Q8_0")
    assert [d.name for d in dl.dest] == [Path(p).name for p in parts]
    assert all(d.exists() for d in dl.dest)


def test_pickle_only_and_gptq_repositories_are_refused_with_the_reason(fake_hub, tmp_path):
    fake_hub.add_file("old/pickled", "pytorch_model.bin", b"\x80\x02", tmp_dir=tmp_path)
    fake_hub.add_file("TheBloke/Some-13B-GPTQ", "model.safetensors", b"{}", tmp_dir=tmp_path)
    mgr = manager(fake_hub, tmp_path)
    with pytest.raises(ModelFileError, match="pickle"):
        mgr.pull("old/pickled", quant="Q4_K_M")
    with pytest.raises(ModelFileError, match=r"GPTQ.*GGUF"):
        mgr.pull("TheBloke/Some-13B-GPTQ", quant="Q4_K_M")


@pytest.fixture
def pull_env(fake_hub, tmp_path, monkeypatch, tiny_model):
    """The fake Hub holding the tiny model as a repository, no user config, an HF cache of our own."""
    from huggingface_hub import constants

    monkeypatch.setenv("ST_BRIDGE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    fake_hub.add_file("tiny/Tiny-Llama-GGUF", "tiny-llama.Q8_0.gguf", tiny_model)
    return fake_hub


def test_pull_load_asks_the_running_bridge_to_load_it(pull_env, start_bridge, tmp_path, capsys):
    from bridge import cli

    models = tmp_path / "served-models"
    models.mkdir()
    server = start_bridge(models=models, wait=("empty",))
    code = cli.main(["pull", "tiny/Tiny-Llama-GGUF", "--file", "tiny-llama.Q8_0.gguf",
                     "--models-dir", str(models), "--port", str(server.port), "--load"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    model_id = "tiny/Tiny-Llama-GGUF/tiny-llama.Q8_0"
    assert f"loaded {model_id} into the bridge on port {server.port}" in out
    status = server.status()
    assert status["state"] == "ready" and status["model"] == model_id


def test_pull_load_without_a_bridge_says_how_to_serve_it(pull_env, tmp_path, capsys):
    from bridge import cli
    from tests.fixtures.server import free_port

    models = tmp_path / "models"
    code = cli.main(["pull", "tiny/Tiny-Llama-GGUF", "--file", "tiny-llama.Q8_0.gguf",
                     "--models-dir", str(models), "--port", str(free_port()), "--load"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    path = models / "tiny/Tiny-Llama-GGUF/tiny-llama.Q8_0.gguf"
    assert path.is_file()
    assert "no bridge answers" in out and f"st-bridge serve --model {path}" in out


def test_pull_load_into_a_bridge_with_another_models_dir_says_where(pull_env, start_bridge, tmp_path, capsys):
    from bridge import cli

    served, elsewhere = tmp_path / "served", tmp_path / "elsewhere"
    served.mkdir()
    server = start_bridge(models=served, wait=("empty",))
    code = cli.main(["pull", "tiny/Tiny-Llama-GGUF", "--file", "tiny-llama.Q8_0.gguf",
                     "--models-dir", str(elsewhere), "--port", str(server.port), "--load"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert f"serves models from {served.resolve()}" in out and f"--models-dir {served.resolve()}" in out
    assert server.status()["state"] == "empty"
