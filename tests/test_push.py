"""peerkit.push: what a receiving peer's answer may put in our report (it is shown to the user)."""

from __future__ import annotations

import pytest

from peerkit.push import from_peer


def test_a_plain_answer_is_reported_as_sent():
    answer = {"ok": True, "files": 12, "rewritten": ["config/app.yml"],
              "stages": [{"name": "lock", "outcome": "ok"}, {"name": "swap", "outcome": "ok"}]}
    assert from_peer(answer) == (12, ["config/app.yml"], "peer: lock ok, swap ok")


@pytest.mark.parametrize("answer,expected", [
    ({"files": "12", "rewritten": "x", "stages": "lock ok"}, (0, [], "peer: ")),
    ({"files": True, "rewritten": [3, None], "stages": [3, "x"]}, (0, [], "peer: ")),
    ({"files": -1}, (0, [], "peer: ")),
    ({"files": 1 << 50}, (0, [], "peer: ")),
    ({"rewritten": ["a\x1b[2Jb", "c\nd"], "stages": [{"name": "lo\x07ck", "outcome": "o\u202ek"}]},
     (0, ["a?[2Jb", "c?d"], "peer: lo?ck o?k")),
    ({"stages": [{"name": "n" * 100, "outcome": None}]}, (0, [], "peer: " + "n" * 32 + " None")),
])
def test_a_peers_answer_reaches_the_report_bounded_and_printable(answer, expected):
    assert from_peer(answer) == expected


def test_a_flood_of_stages_and_paths_is_cut_short():
    files, rewritten, note = from_peer({"rewritten": ["p" * 10_000] * 5000,
                                        "stages": [{"name": "s", "outcome": "ok"}] * 10_000})
    assert len(rewritten) == 1000 and {len(r) for r in rewritten} == {4096}
    assert note.count("s ok") == 64
