"""The install command `st-bridge hardware` prints: the right prebuilt llama-cpp-python for the GPU and
driver, written correctly for bash, PowerShell and cmd (issue 16, item 2).

PowerShell and cmd cannot run here; their forms are checked against their quoting rules as documented
(PowerShell: a quoted program path needs the call operator `&`, `''` inside single quotes; cmd: `set
"NAME=value"`), and the POSIX form is parsed by `shlex` and syntax-checked by bash itself.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from bridge import install_hint
from bridge.install_hint import (
    SOURCE_CUDA,
    VULKAN,
    WHEEL_INDEX,
    cuda_variant,
    detect_shell,
    fix_lines,
    gpu_variants,
    install_command,
    reinstall_command,
)

ROOT = Path(__file__).resolve().parent.parent
WIN_PYTHON = r"C:\Program Files\Python312\python.exe"
POSIX_PYTHON = "/opt/my python/bin/python3"
CU124 = cuda_variant("551.61", ["8.6"], "Windows")


def gpu(driver: str | None, capability: str | None) -> SimpleNamespace:
    return SimpleNamespace(driver=driver, compute_capability=capability)


# --- which build --------------------------------------------------------------------------------------

@pytest.mark.parametrize("driver, capabilities, index", [
    ("580.65.06", ["8.9"], "cu130"),  # CUDA 13 from driver 580
    ("580.65.06", ["8.9", "6.1"], "cu124"),  # CUDA 13 wheels hold no code for pre-Turing GPUs
    ("551.61", ["8.6"], "cu124"),
    ("525.60.13", ["9.0"], "cu124"),  # CUDA 12 from driver 525 (minor-version compatibility)
    ("520.61.05", ["8.6"], "cu118"),
    ("470.82", ["9.0"], None),  # CUDA 11.8 wheels stop before Hopper, and CUDA 12 needs a newer driver
    ("550.54", ["5.2"], None),  # Maxwell: no CUDA wheel holds its code
    (None, ["8.6"], "cu124"),  # driver unknown: the CUDA 12 build, with the driver it needs named
])
def test_cuda_wheel_follows_driver_and_gpu(driver: str | None, capabilities: list[str],
                                           index: str | None) -> None:
    variant = cuda_variant(driver, capabilities)
    assert (variant.index if variant else None) == index


def test_what_a_cuda_wheel_needs_is_said() -> None:
    assert CU124 is not None
    assert "CUDA 12 runtime" in CU124.needs and "CUDA Toolkit 12.x" in CU124.needs
    assert "driver 551.61 runs it" in CU124.needs
    unknown = cuda_variant(None, ["8.6"])
    assert unknown is not None and "driver 525 or newer" in unknown.needs


@pytest.mark.parametrize("system, machine, gpus, indexes", [
    ("Windows", "AMD64", [gpu("551.61", "8.6")], ["cu124", "vulkan"]),
    ("Linux", "x86_64", [gpu("580.95", "12.0")], ["cu130", "vulkan"]),
    ("Linux", "x86_64", [gpu("470.82", "5.2")], ["vulkan"]),
    ("Linux", "aarch64", [gpu("550.54", "8.7")], [None]),  # no CUDA wheels for ARM: compiled
    ("Darwin", "arm64", [], ["metal"]),
    ("Darwin", "x86_64", [], [None]),  # Metal wheels are Apple Silicon only
])
def test_variants_per_platform(system: str, machine: str, gpus: list, indexes: list[str | None]) -> None:
    assert [v.index for v in gpu_variants(gpus, system, machine)] == indexes


# --- the command, per shell ---------------------------------------------------------------------------

def test_posix_command_is_one_argv_without_a_compiler() -> None:
    assert CU124 is not None
    command = install_command(CU124, "0.3.36", "posix", POSIX_PYTHON)
    assert shlex.split(command) == [
        POSIX_PYTHON, "-m", "pip", "install", "--force-reinstall", "--no-deps",
        "--only-binary", "llama-cpp-python", "--extra-index-url", f"{WHEEL_INDEX}/cu124",
        "llama-cpp-python==0.3.36",
    ]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("variant", [VULKAN, SOURCE_CUDA], ids=["wheel", "source"])
def test_posix_command_is_valid_bash(variant: install_hint.Variant) -> None:
    command = install_command(variant, "0.3.36", "posix", POSIX_PYTHON)
    assert subprocess.run(["bash", "-n", "-c", command], capture_output=True).returncode == 0


def test_powershell_calls_a_quoted_path_with_the_call_operator() -> None:
    assert CU124 is not None
    command = install_command(CU124, "0.3.36", "powershell", WIN_PYTHON)
    assert command.startswith(f"& '{WIN_PYTHON}' -m pip install ")
    odd = install_command(CU124, "0.3.36", "powershell", r"C:\Users\O'Brien\py\python.exe")
    assert odd.startswith(r"& 'C:\Users\O''Brien\py\python.exe' -m pip")


def test_cmd_quotes_a_path_with_spaces() -> None:
    assert CU124 is not None
    command = install_command(CU124, "0.3.36", "cmd", WIN_PYTHON)
    assert command.startswith(f'"{WIN_PYTHON}" -m pip install ')
    plain = install_command(CU124, "0.3.36", "cmd", r"C:\Python312\python.exe")
    assert plain.startswith(r"C:\Python312\python.exe -m pip install ")


@pytest.mark.parametrize("shell, prefix", [
    ("posix", 'CMAKE_ARGS="-DGGML_CUDA=on" '),
    ("powershell", '$env:CMAKE_ARGS = "-DGGML_CUDA=on"; '),
    ("cmd", 'set "CMAKE_ARGS=-DGGML_CUDA=on" && '),
])
def test_a_source_build_sets_cmake_args_the_way_each_shell_does(shell: str, prefix: str) -> None:
    command = install_command(SOURCE_CUDA, "0.3.36", shell, "python")  # type: ignore[arg-type]
    assert command.startswith(prefix)
    assert command.endswith("--no-binary llama-cpp-python llama-cpp-python==0.3.36")


@pytest.mark.parametrize("shell", ["powershell", "cmd"])
def test_windows_shells_never_get_the_posix_environment_prefix(shell: str) -> None:
    """The old hint, `CMAKE_ARGS="..." pip install`, is a syntax error in both."""
    for variant in (SOURCE_CUDA, VULKAN, CU124):
        assert variant is not None
        assert not install_command(variant, "0.3.36", shell, WIN_PYTHON).startswith("CMAKE_ARGS=")  # type: ignore[arg-type]


def test_reinstall_command_pins_the_version() -> None:
    command = reinstall_command([gpu("551.61", "8.6")], "0.3.36", system="Windows", machine="AMD64",
                                shell="cmd", python=WIN_PYTHON)
    assert command == (f'"{WIN_PYTHON}" -m pip install --force-reinstall --no-deps --only-binary '
                       f"llama-cpp-python --extra-index-url {WHEEL_INDEX}/cu124 llama-cpp-python==0.3.36")


def test_version_to_install_is_the_installed_one() -> None:
    import llama_cpp

    assert install_hint.version_to_install() == llama_cpp.__version__


# --- the shell ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("parents, shell", [
    (["st-bridge.exe", "pwsh.exe", "WindowsTerminal.exe"], "powershell"),
    (["st-bridge.exe", "powershell.exe", "explorer.exe"], "powershell"),
    (["python.exe", "cmd.exe", "explorer.exe"], "cmd"),
    (["st-bridge.exe", "uv.exe", "bash.exe", "mintty.exe"], "posix"),  # Git Bash
    (["st-bridge.exe", "explorer.exe"], "powershell"),  # no shell found: Windows Terminal's default
    ([], "powershell"),
])
def test_shell_detection_on_windows(parents: list[str], shell: str) -> None:
    assert detect_shell("Windows", parents) == shell


@pytest.mark.parametrize("system", ["Linux", "Darwin"])
def test_other_systems_use_posix_syntax(system: str) -> None:
    assert detect_shell(system, ["cmd.exe"]) == "posix"


# --- the report's lines -------------------------------------------------------------------------------

def _report(python: str, shell: str) -> SimpleNamespace:
    gpus = [gpu("551.61", "8.6")]
    command = reinstall_command(gpus, "0.3.36", system="Windows", machine="AMD64", shell=shell,  # type: ignore[arg-type]
                                python=python)
    return SimpleNamespace(gpus=gpus, llama_cpp_version="0.3.36", reinstall_command=command)


def test_fix_lines_show_the_command_what_it_needs_and_the_vulkan_alternative() -> None:
    lines = fix_lines(_report(WIN_PYTHON, "cmd"), system="Windows", machine="AMD64", shell="cmd",
                      python=WIN_PYTHON)
    assert lines[0].startswith(f'Fix        "{WIN_PYTHON}" -m pip install')
    assert "CUDA Toolkit 12.x" in lines[1]
    assert lines[2].strip().startswith("Or a Vulkan build") and f"{WHEEL_INDEX}/vulkan " in lines[3]
    # the shell may have been guessed wrong: the other Windows shells' forms follow
    assert any(line.strip().startswith(f"in PowerShell: & '{WIN_PYTHON}'") for line in lines)
    assert any(line.strip().startswith(f"in bash: '{WIN_PYTHON}'") for line in lines)


def test_no_other_shell_lines_when_the_command_reads_the_same_everywhere() -> None:
    lines = fix_lines(_report("python", "powershell"), system="Windows", machine="AMD64",
                      shell="powershell", python="python")
    assert not any(line.strip().startswith("in ") for line in lines)


# --- the README ---------------------------------------------------------------------------------------

def test_readme_names_the_wheel_index_and_every_variant_the_hint_can_print() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"--only-binary llama-cpp-python --extra-index-url {WHEEL_INDEX}/<VARIANT> ." in readme
    for index in ("cpu", "cu118", "cu124", "cu130", "metal", "vulkan"):
        assert f"| `{index}` |" in readme, index
