"""The command that puts a GPU-capable llama-cpp-python on this machine, written for the user's shell.

PyPI carries llama-cpp-python only as source, so a plain `pip install` compiles llama.cpp: a C++
compiler everywhere, and the CUDA Toolkit as well for a CUDA build. Its project also publishes prebuilt
wheels, one PEP 503 index per build variant under WHEEL_INDEX (`cpu`, `cu118`, `cu121`..`cu125`,
`cu130`, `cu132`, `metal`, `vulkan`, ...), made from its release tags. The hint therefore names the
wheel index that fits this machine and refuses a source build (`--only-binary`): when the index lacks
the pinned version, pip says so instead of starting a compile that fails half an hour later.

What a wheel needs besides itself (from the project's build workflows; not checked on real machines):
- CUDA wheels link the CUDA runtime (cudart, cuBLAS) of their major version without bundling it, so
  the CUDA Toolkit of that major version must be installed; the driver must be new enough for that
  major version (NVIDIA's minor-version compatibility: CUDA 12 from driver 525, CUDA 13 from 580).
- Vulkan wheels (Linux, Windows) need only a GPU driver with Vulkan, which NVIDIA's, AMD's and Intel's
  drivers include.
- Metal wheels are built for Apple Silicon (arm64) only.

The shell matters for two things: quoting the interpreter's path, and setting CMAKE_ARGS where no wheel
exists and llama.cpp must be compiled. `CMAKE_ARGS="..." pip ...` is a syntax error in PowerShell and
in cmd, so each gets its own form.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shlex
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

WHEEL_INDEX = "https://abetlen.github.io/llama-cpp-python/whl"
PACKAGE = "llama-cpp-python"
Shell = Literal["posix", "powershell", "cmd"]
SHELL_NAMES = {"posix": "bash", "powershell": "PowerShell", "cmd": "cmd"}
_POSIX_SHELLS = {"bash", "sh", "zsh", "dash", "fish", "ksh", "mksh"}
_PARENTS_CHECKED = 6  # st-bridge.exe -> python.exe -> (uv.exe) -> the shell: a few levels suffice

# CUDA wheels by the oldest driver that runs them (NVIDIA minor-version compatibility, major version
# 13 from driver 580, 12 from 525, 11 from 450) and the compute capabilities they hold code for
# (the `cudaArchs` of llama-cpp-python's build-wheels-cuda.yaml; 90-virtual PTX covers newer GPUs).
# Windows has cu118, cu124, cu125, cu130 and cu132; Linux all of them. Newest first.
_CUDA_WHEELS = (
    ("cu130", 580, 13, (7, 5), None),
    ("cu124", 525, 12, (6, 0), None),
    ("cu118", 450, 11, (6, 0), (9, 0)),
)


@dataclass(frozen=True)
class Variant:
    """One way to install llama-cpp-python: a wheel index (`cu124`, `vulkan`, ...) or a source build."""

    index: str | None  # the wheel index under WHEEL_INDEX; None: compile with `cmake_args`
    needs: str  # what else the machine needs, for the user
    cmake_args: str = ""


METAL = Variant("metal", "a Metal build for Apple Silicon; it needs nothing else")
SOURCE_MAC = Variant(None, "compiled here; it needs the Xcode Command Line Tools (xcode-select --install)")
SOURCE_CUDA = Variant(None, "a CUDA build compiled here; it needs a C++ compiler and the CUDA Toolkit",
                      "-DGGML_CUDA=on")
VULKAN = Variant("vulkan", "a Vulkan build; it needs only the GPU driver, and reads prompts slower than CUDA")


def cuda_variant(driver: str | None, capabilities: Sequence[str | None],
                 system: str = "Linux") -> Variant | None:
    """The newest CUDA wheel this driver runs and every GPU has code in; None when there is none."""
    # An unknown driver is taken for one of the CUDA 12 era, the most common and the one the hint names.
    major = _driver_major(driver) or 525
    caps = [_capability(c) for c in capabilities]
    for index, min_driver, cuda, lowest, below in _CUDA_WHEELS:
        if major < min_driver:
            continue
        if any(cap is not None and (cap < lowest or (below and cap >= below)) for cap in caps):
            continue
        driver_note = f"driver {driver} runs it" if driver else f"it needs driver {min_driver} or newer"
        return Variant(index, f"a CUDA {cuda} build; {driver_note}; it needs the CUDA {cuda} runtime: "
                              f"{_cuda_runtime(cuda, system)}")
    return None


def _cuda_runtime(cuda: int, system: str) -> str:
    if system == "Windows":
        # llama-cpp-python adds %CUDA_PATH%\bin to the DLL search path; the Toolkit's installer sets it.
        return f"install the CUDA Toolkit {cuda}.x"
    return f"the CUDA Toolkit {cuda}.x, or your distribution's cudart and cuBLAS {cuda} packages"


def gpu_variants(gpus: Sequence[Any], system: str, machine: str) -> list[Variant]:
    """Ways to get a build that uses these GPUs (NVIDIA, or a Mac's own), best first."""
    if system == "Darwin":
        # Metal wheels exist for Apple Silicon only; an Intel Mac compiles (Xcode Command Line Tools).
        return [METAL] if _is_arm64(machine) else [SOURCE_MAC]
    if system in ("Linux", "Windows") and _is_x86_64(machine):
        driver = next((gpu.driver for gpu in gpus if getattr(gpu, "driver", None)), None)
        cuda = cuda_variant(driver, [getattr(gpu, "compute_capability", None) for gpu in gpus], system)
        return [cuda, VULKAN] if cuda else [VULKAN]
    return [SOURCE_CUDA]  # no CUDA wheels for ARM Linux


def install_command(variant: Variant, version: str | None, shell: Shell, python: str | None = None) -> str:
    """The one-line command that replaces llama-cpp-python in `python`'s environment with `variant`."""
    requirement = f"{PACKAGE}=={version}" if version else PACKAGE
    installer = _installer(python or sys.executable, shell)
    if variant.index is not None:
        return (f"{installer} --force-reinstall --no-deps --only-binary {PACKAGE} "
                f"--extra-index-url {WHEEL_INDEX}/{variant.index} {requirement}")
    command = f"{installer} --force-reinstall --no-deps --no-cache-dir --no-binary {PACKAGE} {requirement}"
    return _with_env(shell, "CMAKE_ARGS", variant.cmake_args, command) if variant.cmake_args else command


def reinstall_command(gpus: Sequence[Any], version: str | None = None, *, system: str | None = None,
                      machine: str | None = None, shell: Shell | None = None,
                      python: str | None = None) -> str:
    """The command for the best variant for these GPUs, in the shell `st-bridge` runs in."""
    system = system or platform.system()
    variant = gpu_variants(gpus, system, machine or platform.machine())[0]
    return install_command(variant, version or version_to_install(), shell or detect_shell(system), python)


def fix_lines(report: Any, *, system: str | None = None, machine: str | None = None,
              shell: Shell | None = None, python: str | None = None) -> list[str]:
    """The report's "Fix" lines: the command, what it needs, the alternative, and other shells' forms."""
    system = system or platform.system()
    shell = shell or detect_shell(system)
    variants = gpu_variants(report.gpus, system, machine or platform.machine())
    version = report.llama_cpp_version or version_to_install()
    lines = [f"Fix        {report.reinstall_command or install_command(variants[0], version, shell, python)}",
             f"           ({variants[0].needs})"]
    for other in variants[1:]:
        lines += [f"           Or {other.needs}:",
                  f"           {install_command(other, version, shell, python)}"]
    if system == "Windows":
        lines += _other_shells(variants[0], version, shell, python)
    return lines


def version_to_install() -> str | None:
    """The installed llama-cpp-python version, else the one st-bridge pins, else None."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        requirements = importlib.metadata.requires("st-bridge") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for req in requirements:
        match = re.fullmatch(r"llama[-_]cpp[-_]python\s*==\s*([\w.]+)", req.strip(), re.IGNORECASE)
        if match:
            return match.group(1)
    return None


# --- the shell ---------------------------------------------------------------------------------------

def detect_shell(system: str | None = None, parents: Iterable[str] | None = None) -> Shell:
    """The shell this command was started from: the nearest shell among the parent processes.

    Only Windows has a choice that changes a command line; when no known shell is found there
    (started from Explorer, a launcher, an IDE), PowerShell is assumed, the default of Windows
    Terminal. `parents` names the parent processes, nearest first (tests).
    """
    if (system or platform.system()) != "Windows":
        return "posix"
    for name in parents if parents is not None else _parent_names():
        base = name.lower().removesuffix(".exe")
        if base in ("pwsh", "powershell"):
            return "powershell"
        if base == "cmd":
            return "cmd"
        if base in _POSIX_SHELLS:  # Git Bash, MSYS2, Cygwin
            return "posix"
    return "powershell"


def _parent_names() -> list[str]:
    import psutil

    try:
        return [p.name() for p in psutil.Process().parents()[:_PARENTS_CHECKED]]
    except psutil.Error:  # a parent that exited or is not ours to inspect: what was read is enough
        return []


def quote(path: str, shell: Shell) -> str:
    """`path` as a command word in `shell` (PowerShell runs a quoted path only through `&`)."""
    if shell == "posix":
        return shlex.quote(path)
    if shell == "powershell":
        return path if re.fullmatch(r"[\w.:\\/-]+", path) else "& '" + path.replace("'", "''") + "'"
    return path if re.fullmatch(r"[\w.:\\/-]+", path) else f'"{path}"'


def _installer(python: str, shell: Shell) -> str:
    """`<python> -m pip install`, or uv's pip where the environment has no pip (uv-made venvs)."""
    word = _short_python(python)
    if importlib.util.find_spec("pip") is None and shutil.which("uv"):
        return f"uv pip install --python {quote(python, shell)}"
    return f"{word or quote(python, shell)} -m pip install"


def _short_python(python: str) -> str | None:
    """`python` (or `python3`) when that name finds this very interpreter, so the line stays short."""
    for name in ("python", "python3"):
        found = shutil.which(name)
        try:
            if found and os.path.samefile(found, python):
                return name
        except OSError:
            continue
    return None


def _with_env(shell: Shell, name: str, value: str, command: str) -> str:
    if shell == "powershell":
        return f'$env:{name} = "{value}"; {command}'
    if shell == "cmd":
        return f'set "{name}={value}" && {command}'
    return f'{name}="{value}" {command}'


def _other_shells(variant: Variant, version: str | None, shell: Shell, python: str | None) -> list[str]:
    """The same command for the other Windows shells, where it is written differently."""
    own = install_command(variant, version, shell, python)
    lines = []
    for other in ("powershell", "cmd", "posix"):
        command = install_command(variant, version, other, python)  # type: ignore[arg-type]
        if other != shell and command != own:
            lines.append(f"           in {SHELL_NAMES[other]}: {command}")
    return lines


# --- small parsers -----------------------------------------------------------------------------------

def _driver_major(driver: str | None) -> int | None:
    match = re.match(r"\s*(\d+)", driver or "")
    return int(match.group(1)) if match else None


def _capability(text: str | None) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _is_x86_64(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64", "x64")


def _is_arm64(machine: str) -> bool:
    return machine.lower() in ("arm64", "aarch64")
