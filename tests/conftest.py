"""Shared pytest set-up. Infrastructure fixtures live in tests/plugins/ and are loaded here."""
pytest_plugins = ["tests.plugins.infra"]
