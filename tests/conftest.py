"""Shared pytest setup. Each capability's fixtures live in its own plugin module under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.sparse",
    "tests.fixtures.tiny",
    "tests.fixtures.server",
    "tests.fixtures.hub",
    "tests.fixtures.sillytavern",
]
