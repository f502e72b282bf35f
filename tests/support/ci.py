"""Skip a test this machine cannot run, except under CI=true, where that is a failure."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """Tell whether this run is CI's (``CI=true``)."""
    return os.environ.get("CI", "").lower() == "true"


def unavailable(what: str, reason: str) -> None:
    """Skip ``what`` for ``reason``; under CI=true fail instead: CI must never go green by skipping."""
    if in_ci():
        pytest.fail(f"{what} cannot run on CI: {reason}", pytrace=False)
    pytest.skip(f"{what} cannot run here: {reason}")
