"""Under CI a missing browser dependency fails the run: a green run means the extension was tested."""

from __future__ import annotations

import pytest

from tests.fixtures import sillytavern


def test_a_missing_dependency_skips_on_a_developers_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="npm is not installed"):
        sillytavern.missing("npm is not installed")


def test_a_missing_dependency_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must run"):
        sillytavern.missing("chromium is missing")
    # The real path: no npm on PATH and SillyTavern not installed yet.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sillytavern, "CACHE", tmp_path / "st")
    with pytest.raises(pytest.fail.Exception, match="npm is not installed"):
        sillytavern.install_sillytavern(sillytavern.ST_VERSIONS[0])
