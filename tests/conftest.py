"""Shared pytest setup. Fixture modules are registered here so each stays small and owned."""

pytest_plugins = [
    "tests.fixtures_kafka",
]
