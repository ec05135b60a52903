"""`st-bridge install-extension ST_DIR` puts the extension where SillyTavern 1.12 and later load it."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from bridge import cli
from bridge.extension_install import FOLDER_NAME, global_data_root, manifest_problems

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder of the test's own, so no real global-mode SillyTavern data folder is seen."""
    home = tmp_path / "home"
    for name in ("HOME", "USERPROFILE"):
        monkeypatch.setenv(name, str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("APPDATA", str(home / "AppData" / "Roaming"))
    return home


def fake_sillytavern(root: Path, version: str = "1.12.14", config: str | None = None) -> Path:
    """A folder laid out like a SillyTavern install: package.json, public/scripts/extensions/, data/."""
    (root / "public" / "scripts" / "extensions").mkdir(parents=True)
    (root / "package.json").write_text(json.dumps({"name": "sillytavern", "version": version}))
    (root / "server.js").write_text("")
    if config is not None:
        (root / "config.yaml").write_text(config)
    return root


def test_the_repository_manifest_passes_sillytaverns_checks() -> None:
    manifest = json.loads((REPO / "manifest.json").read_text())
    assert manifest_problems(REPO) == []
    assert manifest["requires"] == [] and manifest["optional"] == []
    for key in ("display_name", "loading_order", "js", "css", "author", "version", "homePage", "auto_update"):
        assert key in manifest


@pytest.mark.parametrize("version", ["1.12.14", "1.19.0"])
def test_install_puts_the_files_in_the_user_extensions_folder(tmp_path: Path, version: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    st = fake_sillytavern(tmp_path / "SillyTavern", version)
    assert cli.main(["install-extension", str(st)]) == 0
    target = st / "data" / "default-user" / "extensions" / FOLDER_NAME
    assert manifest_problems(target) == []
    manifest = json.loads((target / "manifest.json").read_text())
    assert (target / manifest["js"]).is_file() and (target / manifest["css"]).is_file()
    for name in ("index.js", "settings.html", "connect.js", "api.js"):
        assert (target / "st-extension" / name).read_bytes() == (REPO / "st-extension" / name).read_bytes()
    out = capsys.readouterr().out
    assert f"SillyTavern {version}" in out and "st-bridge serve" in out and "Reload SillyTavern" in out


def test_install_follows_the_data_root_of_config_yaml_and_updates_in_place(tmp_path: Path) -> None:
    st = fake_sillytavern(tmp_path / "st", config="listen: false\ndataRoot: ./my-data # moved\n")
    assert cli.main(["install-extension", str(st)]) == 0
    target = st / "my-data" / "default-user" / "extensions" / FOLDER_NAME
    (target / "st-extension" / "stale.js").write_text("old")
    assert cli.main(["install-extension", str(st)]) == 0  # a second install replaces the first
    assert not (target / "st-extension" / "stale.js").exists()
    assert manifest_problems(target) == []


def test_a_folder_that_is_not_sillytavern_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "package.json").write_text(json.dumps({"name": "something-else"}))
    (tmp_path / "public" / "scripts" / "extensions").mkdir(parents=True)
    assert cli.main(["install-extension", str(tmp_path)]) == 2
    assert "not a SillyTavern folder" in capsys.readouterr().err
    assert cli.main(["install-extension", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_npm_install_folder_gets_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_sillytavern(tmp_path / "node_modules" / "sillytavern")
    assert cli.main(["install-extension", str(tmp_path)]) == 2
    assert "node_modules/sillytavern" in capsys.readouterr().err


def test_a_git_clone_in_the_way_is_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st = fake_sillytavern(tmp_path / "st")
    clone = st / "data" / "default-user" / "extensions" / FOLDER_NAME
    (clone / ".git").mkdir(parents=True)
    (clone / "manifest.json").write_text("{}")
    assert cli.main(["install-extension", str(st)]) == 2
    assert "installed from git" in capsys.readouterr().err
    assert (clone / ".git").is_dir()


def test_a_broken_manifest_is_reported() -> None:
    assert manifest_problems(Path("/nonexistent"))[0].endswith("is missing")


def test_requires_must_be_an_array(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({
        "display_name": "x", "loading_order": 1, "requires": "none", "js": "index.js", "author": "a",
        "version": "1"}))
    problems = manifest_problems(tmp_path)
    assert any("'requires' must be an array" in p for p in problems)
    assert any("index.js" in p for p in problems)


# --- global mode (npm installs, --global) -------------------------------------------------------------

@pytest.mark.parametrize("system, env, home, expected", [
    ("Windows", {"APPDATA": r"C:\Users\me\AppData\Roaming"}, PureWindowsPath(r"C:\Users\me"),
     PureWindowsPath(r"C:\Users\me\AppData\Roaming\SillyTavern\data")),
    ("Windows", {}, PureWindowsPath(r"C:\Users\me"),
     PureWindowsPath(r"C:\Users\me\AppData\Roaming\SillyTavern\data")),
    ("Darwin", {}, PurePosixPath("/Users/me"),
     PurePosixPath("/Users/me/Library/Application Support/SillyTavern/data")),
    ("Linux", {}, PurePosixPath("/home/me"), PurePosixPath("/home/me/.local/share/SillyTavern/data")),
    ("Linux", {"XDG_DATA_HOME": "/data/me"}, PurePosixPath("/home/me"),
     PurePosixPath("/data/me/SillyTavern/data")),
])
def test_global_mode_data_folder_per_platform(system: str, env: dict[str, str], home, expected) -> None:
    assert global_data_root(system, env, home, type(expected)) == expected


def test_install_finds_a_global_mode_data_folder(tmp_path: Path, own_home: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    st = fake_sillytavern(tmp_path / "SillyTavern")  # never started standalone: no data/ of its own
    global_data = global_data_root()
    assert global_data.is_relative_to(own_home)  # %APPDATA%, ~/Library/Application Support or XDG_DATA_HOME
    (global_data / "default-user").mkdir(parents=True)
    assert cli.main(["install-extension", str(st)]) == 0
    assert manifest_problems(global_data / "default-user" / "extensions" / FOLDER_NAME) == []
    assert not (st / "data").exists()
    assert "global-mode data folder" in capsys.readouterr().out


def test_an_npm_installed_sillytavern_is_in_global_mode(tmp_path: Path) -> None:
    st = fake_sillytavern(tmp_path / "app" / "node_modules" / "sillytavern")
    assert cli.main(["install-extension", str(st)]) == 0
    assert manifest_problems(global_data_root() / "default-user" / "extensions" / FOLDER_NAME) == []


def test_a_standalone_data_folder_wins_over_the_global_one(tmp_path: Path) -> None:
    st = fake_sillytavern(tmp_path / "SillyTavern")
    (st / "data").mkdir()
    global_data_root().mkdir(parents=True)
    assert cli.main(["install-extension", str(st)]) == 0
    assert manifest_problems(st / "data" / "default-user" / "extensions" / FOLDER_NAME) == []
    assert not (global_data_root() / "default-user").exists()
