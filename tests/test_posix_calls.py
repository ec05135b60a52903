"""No POSIX-only call outside a platform guard, in the bridge or in its tests (issue 16).

The suite runs on Linux only, so a call that exists only on POSIX, or means something else on Windows,
would first show up on a user's machine: `os.kill(pid, 0)` sends Ctrl+C to the whole console on
Windows, `import fcntl` fails there, `loop.add_signal_handler` raises NotImplementedError. This test
reads the syntax tree of every module under bridge/ and tests/ and fails on such a call unless it sits
under a platform test (`if sys.platform ...`, `if os.name ...`, `hasattr(os, ...)`, an early return or
`pytest.skip` behind one, a `skipif` on the platform), or, for imports, attributes and /proc paths,
inside a `try` that catches what the other platforms raise.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("bridge", "tests")

POSIX_MODULES = {"fcntl", "resource", "pwd", "grp", "termios", "tty", "pty", "posix", "syslog", "crypt"}
POSIX_NAMES = {
    f"os.{name}" for name in (
        "kill", "killpg", "fork", "forkpty", "setsid", "setpgid", "getpgid", "getpgrp", "getuid", "geteuid",
        "getgid", "getegid", "setuid", "setgid", "getgroups", "chown", "lchown", "fchown", "mkfifo", "mknod",
        "nice", "sched_getaffinity", "sched_setaffinity", "getloadavg", "statvfs", "fstatvfs", "uname",
        "pipe2", "wait3", "wait4", "WNOHANG", "openpty", "ttyname", "sync",
    )
} | {
    f"signal.{name}" for name in (
        "SIGKILL", "SIGSTOP", "SIGCONT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD", "SIGQUIT",
        "SIGPIPE", "SIGTSTP", "SIGWINCH", "alarm", "pause", "setitimer", "getitimer", "siginterrupt",
        "pthread_kill", "pthread_sigmask", "sigwait",
    )
}
POSIX_METHODS = {"add_signal_handler", "remove_signal_handler"}
POSIX_PATHS = ("/proc/", "/sys/")
PLATFORM_NAMES = {"sys.platform", "os.name", "platform.system", "sys.getwindowsversion"}
EXITS = {"pytest.skip", "sys.exit"}
# (file, what) -> why it is safe where it stands.
ALLOWED = {
    ("bridge/hardware.py", "/proc/cpuinfo"):
        "read through _read_text, which gives '' off Linux; llama.cpp's own report is used then",
}
# What a `try` must catch for the code in it to count as guarded, by kind of finding.
TRY_GUARDS = {
    "import": {"ImportError", "ModuleNotFoundError"},
    "name": {"AttributeError", "ImportError"},
    "path": {"OSError", "FileNotFoundError"},
}


@dataclass
class Finding:
    path: str
    line: int
    what: str
    kind: str  # import, name, path

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


@dataclass
class Checker:
    """Walks one module; `findings` are the POSIX-only uses outside a guard."""

    path: str
    aliases: dict[str, str] = field(default_factory=dict)  # local name -> dotted name it stands for
    flags: set[str] = field(default_factory=set)  # module-level names assigned a platform test
    findings: list[Finding] = field(default_factory=list)

    # --- names ---------------------------------------------------------------------------------------

    def qualified(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.qualified(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def is_platform_test(self, test: ast.AST) -> bool:
        for node in ast.walk(test):
            name = self.qualified(node)
            if name in PLATFORM_NAMES or (isinstance(node, ast.Name) and node.id in self.flags):
                return True
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr":
                return True
        return False

    def is_platform_skip(self, decorator: ast.AST) -> bool:
        return (isinstance(decorator, ast.Call) and (self.qualified(decorator.func) or "").endswith("skipif")
                and any(self.is_platform_test(arg) for arg in [*decorator.args,
                                                                *(k.value for k in decorator.keywords)]))

    def reads_carefully(self, definition: ast.AST) -> bool:
        """A function that tests the platform or catches OSError may name /proc paths: it copes without."""
        for node in ast.walk(definition):
            if isinstance(node, ast.If) and self.is_platform_test(node.test):
                return True
            caught = [t for h in getattr(node, "handlers", []) for t in _handler_types(h)]
            if isinstance(node, ast.Try) and any(self.qualified(t) in TRY_GUARDS["path"] for t in caught):
                return True
        return False

    def is_exit(self, stmt: ast.stmt) -> bool:
        if isinstance(stmt, ast.Return | ast.Raise | ast.Continue | ast.Break):
            return True
        return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                and self.qualified(stmt.value.func) in EXITS)

    # --- walking -------------------------------------------------------------------------------------

    def check_module(self, tree: ast.Module) -> None:
        self.collect_aliases(tree)
        guarded = self.module_is_skipped(tree)
        self.block(tree.body, frozenset({"all"}) if guarded else frozenset())

    def collect_aliases(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.aliases[(alias.asname or alias.name).split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and self.is_platform_test(stmt.value):
                self.flags |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}

    def module_is_skipped(self, tree: ast.Module) -> bool:
        for stmt in tree.body:
            if (isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                     for t in stmt.targets)):
                marks = stmt.value.elts if isinstance(stmt.value, ast.List | ast.Tuple) else [stmt.value]
                return any(self.is_platform_skip(mark) for mark in marks)
        return False

    def block(self, stmts: list[ast.stmt], guards: frozenset[str]) -> None:
        for stmt in stmts:
            self.statement(stmt, guards)
            if (isinstance(stmt, ast.If) and self.is_platform_test(stmt.test) and stmt.body
                    and self.is_exit(stmt.body[-1])):
                guards = guards | {"all"}  # what follows runs only on the platforms the test let through

    def statement(self, stmt: ast.stmt, guards: frozenset[str]) -> None:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            return  # a docstring
        if isinstance(stmt, ast.If) and self.is_platform_test(stmt.test):
            self.expression(stmt.test, guards)
            self.block(stmt.body, guards | {"all"})
            self.block(stmt.orelse, guards | {"all"})
            return
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if any(self.is_platform_skip(d) for d in stmt.decorator_list):
                guards = guards | {"all"}
            elif self.reads_carefully(stmt):
                guards = guards | {"path"}
        if isinstance(stmt, ast.Try):
            caught = {self.qualified(t) or "" for h in stmt.handlers for t in _handler_types(h)}
            inner = guards | {kind for kind, names in TRY_GUARDS.items() if caught & names}
            self.block(stmt.body, inner)
            for part in (*stmt.handlers, stmt.orelse, stmt.finalbody):
                self.block(part.body if isinstance(part, ast.ExceptHandler) else part, guards)
            return
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            self.imports(stmt, guards)
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.stmt | ast.match_case | ast.ExceptHandler):
                continue
            self.expression(child, guards)
        for name in ("body", "orelse", "finalbody"):
            body = getattr(stmt, name, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                self.block(body, guards)
        for case in getattr(stmt, "cases", []):
            self.block(case.body, guards)
        for handler in getattr(stmt, "handlers", []):
            self.block(handler.body, guards)

    def imports(self, stmt: ast.Import | ast.ImportFrom, guards: frozenset[str]) -> None:
        modules = [a.name for a in stmt.names] if isinstance(stmt, ast.Import) else [stmt.module or ""]
        for module in modules:
            if module.split(".")[0] in POSIX_MODULES:
                self.report(stmt, f"import {module}", "import", guards)

    def expression(self, node: ast.AST, guards: frozenset[str]) -> None:
        for sub in ast.walk(node):
            name = self.qualified(sub) if isinstance(sub, ast.Name | ast.Attribute) else None
            if name in POSIX_NAMES:
                self.report(sub, name, "name", guards)
            elif isinstance(sub, ast.Attribute) and sub.attr in POSIX_METHODS:
                self.report(sub, f".{sub.attr}()", "name", guards)
            elif isinstance(sub, ast.Call) and _fork_start(sub):
                self.report(sub, "the 'fork' start method", "name", guards)
            elif isinstance(sub, ast.Constant) and _posix_path(sub):  # f-strings too: their parts
                self.report(sub, _posix_path(sub), "path", guards)

    def report(self, node: ast.AST, what: str, kind: str, guards: frozenset[str]) -> None:
        if "all" in guards or kind in guards or (self.path, what) in ALLOWED:
            return
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), what, kind))


def _handler_types(handler: ast.ExceptHandler) -> list[ast.expr]:
    if handler.type is None:
        return []
    return list(handler.type.elts) if isinstance(handler.type, ast.Tuple) else [handler.type]


def _fork_start(call: ast.Call) -> bool:
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    return (name in ("get_context", "set_start_method") and bool(call.args)
            and isinstance(call.args[0], ast.Constant) and call.args[0].value in ("fork", "forkserver"))


def _posix_path(node: ast.Constant) -> str:
    text = node.value if isinstance(node.value, str) else ""
    return text if text.startswith(POSIX_PATHS) else ""


def check_source(source: str, path: str = "<snippet>") -> list[Finding]:
    checker = Checker(path)
    checker.check_module(ast.parse(source))
    return checker.findings


def python_files() -> list[Path]:
    """Every module scanned, but this one: its tables name what they look for."""
    here = Path(__file__).resolve()
    return sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py") if p.resolve() != here)


# --- the code base -----------------------------------------------------------------------------------

def test_no_posix_only_call_outside_a_platform_guard() -> None:
    findings = []
    for path in python_files():
        findings += check_source(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    assert not findings, "POSIX-only calls outside a platform guard:\n" + "\n".join(map(str, findings))


def test_every_allowance_is_still_needed() -> None:
    texts = {path: (ROOT / path).read_text(encoding="utf-8") for path, _ in ALLOWED}
    stale = [f"{path}: {what}" for path, what in ALLOWED if what not in texts[path]]
    assert not stale, f"allowances for code that is gone (remove them from ALLOWED): {stale}"


# --- the checker itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("source, what", [
    ("import os\nos.kill(pid, 0)\n", "os.kill"),
    ("from os import kill\nkill(pid, 0)\n", "os.kill"),
    ("import signal\nsignal.SIGKILL\n", "signal.SIGKILL"),
    ("import fcntl\n", "import fcntl"),
    ("def f(loop):\n    loop.add_signal_handler(2, f)\n", ".add_signal_handler()"),
    ("import multiprocessing as mp\nmp.get_context('fork')\n", "the 'fork' start method"),
    ("def f(pid):\n    return open(f'/proc/{pid}/stat').read()\n", "/proc/"),
    ("import os, sys\nif sys.platform == 'win32':\n    pass\nos.kill(1, 9)\n", "os.kill"),
    ("import os\ntry:\n    os.kill(1, 0)\nexcept OSError:\n    pass\n", "os.kill"),
])
def test_the_checker_finds(source: str, what: str) -> None:
    assert [f.what for f in check_source(source)] == [what]


@pytest.mark.parametrize("source", [
    "import os, sys\nif sys.platform != 'win32':\n    os.kill(1, 0)\n",
    "import os\nif os.name == 'posix':\n    os.killpg(1, 9)\nelse:\n    pass\n",
    "import os, sys\ndef f():\n    if sys.platform == 'win32':\n        return\n    os.kill(1, 0)\n",
    "import os\nif hasattr(os, 'getuid'):\n    os.getuid()\n",
    "try:\n    import fcntl\nexcept ImportError:\n    fcntl = None\n",
    "import os, sys\nWINDOWS = sys.platform == 'win32'\nif not WINDOWS:\n    os.setsid()\n",
    "import os, sys, pytest\n@pytest.mark.skipif(sys.platform == 'win32', reason='x')\n"
    "def test_x():\n    os.kill(1, 9)\n",
    "import os, sys, pytest\npytestmark = pytest.mark.skipif(sys.platform != 'linux', reason='x')\n"
    "def test_x():\n    open('/proc/self/status')\n",
    "import sys, pytest\ndef test_x():\n    if sys.platform != 'linux':\n        pytest.skip('x')\n"
    "    open('/proc/self/status')\n",
    "def f():\n    try:\n        return open('/proc/cpuinfo').read()\n    except OSError:\n"
    "        return ''\n",
    "def f(path='/proc/meminfo'):\n    try:\n        return open(path).read()\n    except OSError:\n"
    "        return ''\n",
    '"""/proc/cpuinfo is read here."""\n',
])
def test_the_checker_accepts_guarded_code(source: str) -> None:
    assert check_source(source) == []
