"""peerkit.errors: one hierarchy, stable machine codes, distinct exit codes."""

from __future__ import annotations

import json
from collections import Counter

import click
import pytest

from peerkit import errors
from peerkit.cli import main as cli_main

ALL = errors.all_errors()
# Codes shared on purpose: a lock held by another process is "busy" whether
# it guards authorized_keys (Busy) or one app's transfer (AppBusy).
SHARED_CODES = {"busy": {errors.Busy, errors.AppBusy}}


def test_all_errors_lists_every_class_defined_in_the_module():
    defined = {obj for obj in vars(errors).values()
               if isinstance(obj, type) and issubclass(obj, errors.PeerkitError)}
    assert set(ALL) == defined
    assert ALL[0] is errors.PeerkitError
    assert len(ALL) == len(set(ALL))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_class_has_a_code_an_exit_code_and_a_message(cls):
    assert isinstance(cls.code, str) and cls.code
    assert cls.code == cls.code.strip().lower() and " " not in cls.code
    assert isinstance(cls.exit_code, int) and 0 < cls.exit_code < 256
    assert cls.exit_code != cli_main.USAGE_EXIT
    exc = cls()
    assert exc.message and "\n" not in exc.message
    assert str(exc) == exc.message
    assert exc.to_json() == {"ok": False, "error": cls.code, "message": exc.message}


def test_exit_codes_are_unique():
    counts = Counter(cls.exit_code for cls in ALL)
    assert [code for code, n in counts.items() if n > 1] == []


def test_codes_are_unique_except_the_deliberately_shared_ones():
    by_code: dict[str, set] = {}
    for cls in ALL:
        by_code.setdefault(cls.code, set()).add(cls)
    shared = {code: classes for code, classes in by_code.items() if len(classes) > 1}
    assert shared == SHARED_CODES


def test_detail_is_appended_to_the_docstring_message():
    exc = errors.NoSuchPeer("beta")
    assert exc.message == "No peer of that name is paired: beta"
    assert exc.detail == "beta"
    assert errors.NoSuchPeer().message == "No peer of that name is paired."


def test_token_errors_share_a_base_class():
    for cls in (errors.NotAToken, errors.UnsupportedVersion, errors.FingerprintMismatch,
                errors.BadField, errors.ChecksumMismatch):
        assert issubclass(cls, errors.TokenError)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_main_maps_each_error_to_its_exit_code_and_json_code(cls, capsys):
    # A throwaway command that raises the error, run through the real run().
    @click.command("raise-it")
    def raise_it() -> None:
        raise cls("some detail")

    cli_main.cli.add_command(raise_it)
    try:
        status = cli_main.run(["--json", "raise-it"])
    finally:
        cli_main.cli.commands.pop("raise-it")
    out, err = capsys.readouterr()
    assert status == cls.exit_code
    last = json.loads(out.strip().splitlines()[-1])
    assert last == {"ok": False, "error": cls.code, "message": cls("some detail").message}
    assert err.startswith("peerkit: error: ")


def test_main_without_json_prints_only_to_stderr(capsys):
    @click.command("raise-it")
    def raise_it() -> None:
        raise errors.NoSuchPeer("beta")

    cli_main.cli.add_command(raise_it)
    try:
        status = cli_main.run(["raise-it"])
    finally:
        cli_main.cli.commands.pop("raise-it")
    out, err = capsys.readouterr()
    assert status == 30
    assert out == ""
    assert err == "peerkit: error: No peer of that name is paired: beta\n"
