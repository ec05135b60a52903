"""Every browser test runs against each pinned SillyTavern release (the session fixture `stage`) and ends
with no new errors in the browser console."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.sillytavern import Stage

# Chromium logs every refused connection as a console error; the extension meets those only while the
# bridge is down (the restart test), and they are the browser's report, not an error in the page's code.
EXPECTED_WHILE_BRIDGE_IS_DOWN = "net::ERR_CONNECTION_REFUSED"


@pytest.fixture(autouse=True)
def no_console_errors(stage: Stage) -> Iterator[None]:
    before = len(stage.browser.console_errors)
    yield
    new = [e for e in stage.browser.console_errors[before:] if EXPECTED_WHILE_BRIDGE_IS_DOWN not in e]
    assert new == [], f"errors in the browser console: {new}"
