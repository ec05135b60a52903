"""Shared pytest setup. Each capability's fixtures live in its own plugin module under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.sparse",
    "tests.fixtures.tiny",
    "tests.fixtures.server",
    "tests.fixtures.hub",
    "tests.fixtures.rpc",
    "tests.fixtures.sillytavern",
]


def pytest_collection_modifyitems(config, items):
    """Browser tests run last: Playwright's sync API keeps an event loop running in the main thread
    for the rest of the session, which the asyncio tests cannot share."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
