"""Shared pytest setup. Each capability's fixtures live in its own plugin module under tests/fixtures/."""

import os

# No first-use speed measurement in bridges the tests start (a few seconds each, in every fresh data dir):
# their speeds are estimates. tests/test_speed.py measures on purpose.
os.environ.setdefault("ST_BRIDGE_SPEED_PROBE", "false")

pytest_plugins = [
    "tests.fixtures.sparse",
    "tests.fixtures.tiny",
    "tests.fixtures.companions",
    "tests.fixtures.server",
    "tests.fixtures.hub",
    "tests.fixtures.rpc",
    "tests.fixtures.sillytavern",
    "tests.fixtures.netns",
]


def pytest_collection_modifyitems(config, items):
    """Browser tests run last: Playwright's sync API keeps an event loop running in the main thread
    for the rest of the session, which the asyncio tests cannot share."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
