"""The hostile-input and fault suites: options, the counted summary line, the shared real-process world."""

from __future__ import annotations

import pytest

from tests.hostile import counts, rig


def pytest_addoption(parser):
    counts.add_option(parser)


def pytest_configure(config):
    counts.configure(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts.terminal_summary(terminalreporter)


def pytest_sessionfinish(session, exitstatus):
    rig.shutdown()


@pytest.fixture(scope="session")
def world() -> rig.World:
    """Throwaway users, a private sshd and peerkit instances (made once per session, on first use)."""
    try:
        return rig.get_world()
    except rig.Unavailable as exc:
        rig.unavailable(str(exc))
