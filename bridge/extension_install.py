"""`st-bridge install-extension ST_DIR`: put the SillyTavern extension where SillyTavern loads it.

SillyTavern discovers third-party extensions in `<dataRoot>/<user>/extensions/<folder>/` (1.12 and every
later release; 1.12.9+ also reads `public/scripts/extensions/third-party/`, 1.12.6 does not), so that is
where the files go. The folder keeps the repository's layout, `manifest.json` at its top and the code in
`st-extension/`, because the manifest's `js` and `css` paths are relative to the manifest and the same
manifest also serves SillyTavern's own "Install extension" from the git URL.

Where `<dataRoot>` is depends on SillyTavern's mode (its documentation, Installation, "Global / Standalone
mode"). Standalone, the default for git clones and zips, keeps `config.yaml` and `data/` in its folder.
Global mode, the default of the npm package (`npx sillytavern@latest`) and chosen with `--global`, keeps
them in the user's application data: `%APPDATA%\\SillyTavern\\data` on Windows,
`~/Library/Application Support/SillyTavern/data` on macOS, `$XDG_DATA_HOME/SillyTavern/data` (by default
`~/.local/share/SillyTavern/data`) on Linux.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

from .errors import BadRequest, Conflict, NotFound

FOLDER_NAME = "st-bridge"
DEFAULT_USER = "default-user"
EXTENSION_DIR = "st-extension"
# The manifest keys SillyTavern reads; `requires` must be an array or 1.12 silently skips the extension.
REQUIRED_KEYS = ("display_name", "loading_order", "requires", "js", "author", "version")


@dataclass
class InstallResult:
    target: Path  # the extension folder inside SillyTavern's data
    st_version: str
    replaced: bool  # an earlier copy was there and has been replaced
    data_from: str = "standalone"  # where the data root came from: standalone, global, config.yaml, given


def extension_source() -> Path:
    """The folder holding `manifest.json` and `st-extension/`.

    A source checkout (or an editable install) has them beside the `bridge` package; an installed wheel
    carries them under `<prefix>/share/st-bridge/`.
    """
    candidates = [Path(__file__).resolve().parent.parent, Path(sys.prefix) / "share" / "st-bridge"]
    for folder in candidates:
        if (folder / "manifest.json").is_file() and (folder / EXTENSION_DIR / "index.js").is_file():
            return folder
    searched = ", ".join(str(c) for c in candidates)
    raise NotFound(f"the extension's files (manifest.json, {EXTENSION_DIR}/) were not found in: {searched}")


def sillytavern_version(st_dir: Path) -> str:
    """The version of the SillyTavern install at `st_dir`, or a clear error when it is not one."""
    package = st_dir / "package.json"
    hint = ""
    if (st_dir / "node_modules" / "sillytavern" / "package.json").is_file():
        hint = f" (installed from npm? try {st_dir / 'node_modules' / 'sillytavern'})"
    if not st_dir.is_dir():
        raise NotFound(f"{st_dir} does not exist")
    if not package.is_file() or not (st_dir / "public" / "scripts" / "extensions").is_dir():
        raise BadRequest(f"{st_dir} does not look like a SillyTavern folder: it needs package.json and "
                         f"public/scripts/extensions/{hint}")
    try:
        meta = json.loads(package.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadRequest(f"{package} cannot be read: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("name") != "sillytavern":
        raise BadRequest(f"{st_dir} is not a SillyTavern folder: package.json names "
                         f"{meta.get('name') if isinstance(meta, dict) else meta!r}, not 'sillytavern'{hint}")
    return str(meta.get("version", "unknown"))


def data_root(st_dir: Path, global_root: Path | None = None) -> tuple[Path, str]:
    """SillyTavern's data root, and where that answer came from.

    In order: `dataRoot` in ST_DIR/config.yaml; an existing ST_DIR/data (standalone mode has run);
    an existing global-mode data folder, or an npm install (global mode by default); ST_DIR/data.
    """
    configured = _configured_root(st_dir)
    if configured is not None:
        return configured, "config.yaml"
    standalone = st_dir / "data"
    global_root = global_root or global_data_root()
    if standalone.is_dir():
        return standalone, "standalone"
    if global_root.is_dir() or "node_modules" in st_dir.parts:
        return global_root, "global"
    return standalone, "standalone"


def _configured_root(st_dir: Path) -> Path | None:
    """`dataRoot` from ST_DIR/config.yaml: only that top-level key is needed, so a line match does."""
    config = st_dir / "config.yaml"
    if not config.is_file():
        return None
    match = re.search(r"^dataRoot:\s*['\"]?([^'\"#\n]+?)['\"]?\s*(#.*)?$",
                      config.read_text(encoding="utf-8", errors="replace"), re.MULTILINE)
    if not match:
        return None
    root = Path(match.group(1).strip())
    return root if root.is_absolute() else st_dir / root


def global_data_root(system: str | None = None, env: Mapping[str, str] | None = None,
                     home: PurePath | None = None, path: type[PurePath] = Path) -> PurePath:
    """SillyTavern's data folder in global mode on `system` (this machine's by default)."""
    system = system or platform.system()
    env = os.environ if env is None else env
    home = home if home is not None else Path.home()
    if system == "Windows":
        base = path(env["APPDATA"]) if env.get("APPDATA") else path(home, "AppData", "Roaming")
    elif system == "Darwin":
        base = path(home, "Library", "Application Support")
    else:
        base = path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else path(home, ".local", "share")
    return base / "SillyTavern" / "data"


def manifest_problems(folder: Path) -> list[str]:
    """What SillyTavern would object to in `folder/manifest.json`; empty when it loads the extension."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{path} is missing"]
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path} is not valid JSON: {exc}"]
    if not isinstance(manifest, dict):
        return [f"{path} must hold a JSON object"]
    problems = [f"'{key}' is missing" for key in REQUIRED_KEYS if key not in manifest]
    for key in ("requires", "optional"):
        if key in manifest and not isinstance(manifest[key], list):
            problems.append(f"'{key}' must be an array (SillyTavern 1.12 skips the extension otherwise)")
    for key in ("js", "css"):
        relative = manifest.get(key)
        if isinstance(relative, str) and not (folder / relative).is_file():
            problems.append(f"'{key}' names {relative}, which is not in {folder}")
    return problems


def _is_ours(folder: Path) -> bool:
    """True when `folder` holds an earlier copy made by this command (safe to replace)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("js") == f"{EXTENSION_DIR}/index.js"


def _copy_extension(source: Path, target: Path) -> None:
    """Copy into a fresh sibling folder, then swap it in, so a failed copy never leaves half a folder."""
    staging = target.with_name(f".{target.name}.installing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy2(source / "manifest.json", staging / "manifest.json")
    shutil.copytree(source / EXTENSION_DIR, staging / EXTENSION_DIR,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def install_extension(st_dir: Path, *, user: str = DEFAULT_USER, data_dir: Path | None = None,
                      source: Path | None = None) -> InstallResult:
    """Install (or update) the extension into the SillyTavern at `st_dir` for `user`.

    Raises:
        NotFound: `st_dir` or the extension's own files are missing.
        BadRequest: `st_dir` is not a SillyTavern folder, or the manifest would not load.
        Conflict: the target folder holds something else (for example a git clone made by SillyTavern's
            "Install extension"), which is left alone.
    """
    st_dir = st_dir.expanduser().resolve()
    version = sillytavern_version(st_dir)
    source = source or extension_source()
    problems = manifest_problems(source)
    if problems:
        raise BadRequest("the extension's manifest would not load: " + "; ".join(problems))
    root, data_from = (data_dir, "given") if data_dir else data_root(st_dir)
    target = root / user / "extensions" / FOLDER_NAME
    replaced = target.exists()
    if replaced and ((target / ".git").exists() or not _is_ours(target)):
        raise Conflict(f"{target} already holds another copy (installed from git?); update it from "
                       "SillyTavern's extension manager, or remove that folder and run this again")
    _copy_extension(source, target)
    return InstallResult(target=target, st_version=version, replaced=replaced, data_from=data_from)


def next_steps(result: InstallResult) -> str:
    """What the user does after installing, printed by the command."""
    verb = "Updated" if result.replaced else "Installed"
    where = []
    if result.data_from == "global":
        where = ["(SillyTavern's global-mode data folder, used by npm installs and `--global`; for a",
                 " SillyTavern started without --global, pass --data-root <its folder>/data)"]
    return "\n".join([
        f"{verb} the st-bridge extension for SillyTavern {result.st_version} in {result.target}",
        *where,
        "",
        "Next:",
        "  1. Start the bridge:       st-bridge serve",
        "  2. Reload SillyTavern in the browser (no restart needed).",
        "  3. Open Extensions (the stacked-blocks icon) > st-bridge, then press \"Use in SillyTavern\".",
    ])
