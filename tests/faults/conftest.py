"""The fault-injection suite: the same options, summary line and world as the hostile-input suite."""

from tests.hostile.conftest import (  # noqa: F401  (pytest finds hooks and fixtures by name)
    pytest_addoption,
    pytest_configure,
    pytest_sessionfinish,
    pytest_terminal_summary,
    world,
)
