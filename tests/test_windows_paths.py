"""Windows rules on Linux: Hub file names checked under `PureWindowsPath`, model ids that do not depend on
the separator, and models that another program holds open when they are deleted or replaced (issue 16).

Windows refuses to delete or replace a file that is open (llama.cpp maps the model it serves) with
PermissionError and a `winerror` of 32; these tests raise exactly that where the file system is touched.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import SimpleNamespace

import pytest

from bridge import cli, files, library
from bridge.downloads import DownloadManager
from bridge.errors import Conflict, UnsafePath
from bridge.files import FileInUse
from bridge.safe_names import name_problem
from tests.fixtures.sparse_models import write_small_gguf

REPO = "owner/Model-GGUF"


def manager(models_dir: PurePosixPath | PureWindowsPath) -> DownloadManager:
    mgr = DownloadManager(Path("unused"), hub=SimpleNamespace())  # type: ignore[arg-type]
    mgr.models_dir = models_dir  # type: ignore[assignment]  # where files would land, under that OS's rules
    return mgr


def sharing_violation() -> PermissionError:
    """What Windows raises for a file another process has open (ERROR_SHARING_VIOLATION)."""
    exc = PermissionError(errno.EACCES, "The process cannot access the file because it is being used")
    exc.winerror = 32  # type: ignore[attr-defined]  # set by CPython on Windows only
    return exc


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))


# --- Hub file names ------------------------------------------------------------------------------------

def test_a_colon_would_leave_the_models_dir_under_windows_rules() -> None:
    """Why the names are checked: pathlib's own Windows join of a Hub name with a drive letter in it."""
    assert PureWindowsPath("D:/models").joinpath("owner", "repo", "b:c.gguf") == PureWindowsPath("b:c.gguf")


@pytest.mark.parametrize("path", [
    "a/b:c.gguf",  # drive-relative: lands outside the models dir
    "C:evil.gguf",  # the current folder of drive C:
    "x.gguf:stream",  # an NTFS alternate data stream
    "CON.gguf", "nul", "com1.Q4_K_M.gguf", "LPT9",  # devices, with or without a suffix
    "model.gguf.", "model.gguf ",  # Windows drops a trailing dot or space: another file than asked for
    r"a\b.gguf", 'a"b.gguf', "a|b.gguf", "a?b.gguf", "a*b.gguf", "a<b.gguf", "a\tb.gguf",
    "dir/../x.gguf", "./x.gguf", "a//b.gguf", "",
    "x" * 256 + ".gguf",
])
@pytest.mark.parametrize("models_dir", [PureWindowsPath("D:/models"), PurePosixPath("/srv/models")])
def test_unsafe_hub_file_names_are_refused_on_every_platform(path: str, models_dir) -> None:
    with pytest.raises(UnsafePath):
        manager(models_dir).destination(REPO, path)


@pytest.mark.parametrize("repo", ["own:er/repo", "owner/CON", "owner", "a/b/c", "owner/repo."])
def test_unsafe_repository_names_are_refused(repo: str) -> None:
    with pytest.raises(UnsafePath):
        manager(PureWindowsPath("D:/models")).destination(repo, "model.gguf")


@pytest.mark.parametrize("models_dir, expected", [
    (PureWindowsPath("D:/models"), PureWindowsPath(r"D:\models\owner\Model-GGUF\Q4\model-Q4_K_M.gguf")),
    (PurePosixPath("/srv/models"), PurePosixPath("/srv/models/owner/Model-GGUF/Q4/model-Q4_K_M.gguf")),
])
def test_a_good_name_lands_inside_the_models_dir(models_dir, expected) -> None:
    assert manager(models_dir).destination(REPO, "Q4/model-Q4_K_M.gguf") == expected


def test_ordinary_names_pass() -> None:
    for name in ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "model-00001-of-00002.gguf", "Q4_K_M", ".hidden",
                 "con-tiny.gguf", "console.gguf", "日本語モデル.gguf"):
        assert name_problem(name) is None, name


# --- ids that do not depend on the separator -----------------------------------------------------------

@pytest.mark.parametrize("root, path", [
    (PureWindowsPath(r"D:\models"), PureWindowsPath(r"D:\models\owner\Model-GGUF\sub\m-Q4_K_M.gguf")),
    (PurePosixPath("/srv/models"), PurePosixPath("/srv/models/owner/Model-GGUF/sub/m-Q4_K_M.gguf")),
])
def test_model_ids_use_slashes_whatever_the_platform(root, path) -> None:
    assert library.model_id(path, root) == "owner/Model-GGUF/sub/m-Q4_K_M"


def test_a_download_names_the_model_id_it_will_have(fake_hub, tmp_path: Path) -> None:
    from bridge.hub import HubClient

    fake_hub.add_file(REPO, "sub/m-Q8_0.gguf", b"GGUF" + bytes(4096), tmp_dir=tmp_path / "hub")
    mgr = DownloadManager(tmp_path / "models", HubClient(endpoint=fake_hub.endpoint),
                          hf_cache_dir=tmp_path / "hf-cache")
    data = mgr.pull(REPO, file="sub/m-Q8_0.gguf").to_dict()
    assert data["model_id"] == "owner/Model-GGUF/sub/m-Q8_0"  # the panel matches this, not OS paths
    assert [m.id for m in library.scan(tmp_path / "models")] == [data["model_id"]]


# --- files another program holds open ------------------------------------------------------------------

def test_replace_waits_out_a_scanner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = tmp_path / "new", tmp_path / "model.gguf"
    source.write_text("new")
    real, calls = os.replace, []

    def held_twice(src, dst):
        calls.append(dst)
        if len(calls) <= 2:
            raise sharing_violation()
        real(src, dst)

    monkeypatch.setattr(os, "replace", held_twice)
    files.replace(source, target)
    assert target.read_text() == "new" and len(calls) == 3


def test_replace_of_a_file_that_stays_open_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(sharing_violation()))
    with pytest.raises(FileInUse, match="is open in another program"):
        files.replace(tmp_path / "a", tmp_path / "b")


def test_a_posix_permission_error_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def denied(*_):
        calls.append(1)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(Conflict, match="Permission denied") as caught:
        files.replace(tmp_path / "a", tmp_path / "b")
    assert not isinstance(caught.value, FileInUse) and calls == [1]


def a_model(models: Path) -> Path:
    models.mkdir(parents=True, exist_ok=True)
    return write_small_gguf(models / "m-Q8_0.gguf")


def held_open(monkeypatch: pytest.MonkeyPatch, held: Path) -> None:
    real = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == held:
            raise sharing_violation()
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)


def test_deleting_an_open_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = a_model(tmp_path / "models")
    held_open(monkeypatch, model)
    with pytest.raises(FileInUse):
        DownloadManager(tmp_path / "models").delete(model)
    assert model.exists()


def test_cli_delete_of_an_open_model_prints_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = a_model(tmp_path / "models")
    held_open(monkeypatch, model)
    monkeypatch.setenv("ST_BRIDGE_PORT", "9")  # no bridge answers there
    monkeypatch.setenv("ST_BRIDGE_CONFIG", str(tmp_path / "no-config.toml"))
    assert cli.main(["models", "--delete", "m-Q8_0", "--models-dir", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is open in another program" in err and err.count("\n") == 1


def test_cli_refuses_to_delete_the_model_a_running_bridge_serves(
        start_bridge, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "served"
    models.mkdir()
    shutil.copyfile(tiny_model, models / "tiny-Q8_0.gguf")
    server = start_bridge("--model", "tiny-Q8_0", models=models)
    monkeypatch.setenv("ST_BRIDGE_PORT", str(server.port))
    monkeypatch.setenv("ST_BRIDGE_CONFIG", str(tmp_path / "no-config.toml"))
    assert cli.main(["models", "--delete", "tiny-Q8_0", "--models-dir", str(models)]) == 2
    assert "is serving tiny-Q8_0: unload it first" in capsys.readouterr().err
    assert (models / "tiny-Q8_0.gguf").exists()
