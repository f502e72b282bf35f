"""Repointing a pulled app from the source peer's domain to ours (peerkit.urlrewrite)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerkit import listing
from peerkit.config import DEFAULT_REWRITE_GLOBS
from peerkit.urlrewrite import MAX_FILE, rewrite

from tests.trees import diff, fds_into, snapshot

GLOBS = tuple(DEFAULT_REWRITE_GLOBS)
SRC, DST = "old.example", "new.example"


@pytest.fixture
def app(tmp_path: Path) -> Path:
    path = tmp_path / "apps" / "web"
    path.mkdir(parents=True)
    return path


def write(path: Path, text: str | bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    return path


def test_rewrites_the_default_files(app: Path) -> None:
    write(app / ".env", "URL=https://old.example/\nHOST=app.old.example\n")
    write(app / "prod.env", "MAIL=ops@old.example\n")
    write(app / "docker-compose.yml", "labels:\n  - traefik.http.routers.web.rule=Host(`old.example`)\n")
    write(app / "compose.yaml", "x: old.example\n")
    write(app / "compose.yml", "x: old.example\n")
    write(app / "sub" / "dir" / ".env", "DOMAIN=old.example\n")
    untouched = {
        "README.md": "see https://old.example/\n",
        "config.json": '{"host": "old.example"}\n',
        "env": "old.example\n",
        ".env.example": "old.example\n",
        "docker-compose.override.yml": "old.example\n",
    }
    for name, text in untouched.items():
        write(app / name, text)

    changed = rewrite(app, SRC, DST, GLOBS)

    assert changed == [".env", "compose.yaml", "compose.yml", "docker-compose.yml", "prod.env",
                       "sub/dir/.env"]
    assert (app / ".env").read_text() == "URL=https://new.example/\nHOST=app.new.example\n"
    assert (app / "prod.env").read_text() == "MAIL=ops@new.example\n"
    assert "Host(`new.example`)" in (app / "docker-compose.yml").read_text()
    assert (app / "sub" / "dir" / ".env").read_text() == "DOMAIN=new.example\n"
    for name, text in untouched.items():
        assert (app / name).read_text() == text, name


def test_result_is_sorted(app: Path) -> None:
    for rel in ("z.env", "a/.env", "m/n/.env", "b.env", "A.env"):
        write(app / rel, "old.example\n")
    assert rewrite(app, SRC, DST, GLOBS) == ["A.env", "a/.env", "b.env", "m/n/.env", "z.env"]


@pytest.mark.parametrize(("before", "after"), [
    # Rewritten: the domain itself and its subdomains, wherever a label ends.
    ("old.example", "new.example"),
    ("app.old.example", "app.new.example"),
    ("a.b-c.old.example", "a.b-c.new.example"),
    ("https://old.example:8443/path?q=old.example", "https://new.example:8443/path?q=new.example"),
    ("ops@old.example", "ops@new.example"),
    ('"old.example"', '"new.example"'),
    ("Visit old.example.", "Visit new.example."),  # a sentence's full stop is not a label
    ("old.example/", "new.example/"),
    ("OLD.EXAMPLE", "new.example"),  # case-insensitive match, target as configured
    ("App.Old.Example", "App.new.example"),
    ("old.example,old.example", "new.example,new.example"),
    ("_old.example", "_new.example"),
    # Not rewritten: a longer label before or after, or another domain below it.
    ("notold.example", None),
    ("not-old.example", None),
    ("old.examples", None),
    ("old.example-x", None),
    ("old.example.evil", None),
    ("app.old.example.evil:443", None),
    ("oldxexample", None),  # the dot is literal, not "any character"
    ("old.exampl", None),
])
def test_label_boundaries(app: Path, before: str, after: str | None) -> None:
    write(app / ".env", f"X={before}\n")
    changed = rewrite(app, SRC, DST, GLOBS)
    assert (app / ".env").read_text() == f"X={after if after is not None else before}\n"
    assert changed == ([".env"] if after is not None else [])


def test_keeps_mode_and_owner(app: Path) -> None:
    env = write(app / ".env", "old.example\n", 0o640)
    exe = write(app / "hook.env", "old.example\n", 0o750)
    if os.geteuid() == 0:
        os.chown(env, 1234, 5678)
    rewrite(app, SRC, DST, GLOBS)
    assert stat.S_IMODE(env.stat().st_mode) == 0o640
    assert stat.S_IMODE(exe.stat().st_mode) == 0o750
    if os.geteuid() == 0:
        assert (env.stat().st_uid, env.stat().st_gid) == (1234, 5678)
    assert env.read_text() == "new.example\n"
    assert [p.name for p in app.iterdir() if p.name not in (".env", "hook.env")] == []  # no temp files


def test_skips_binary_files(app: Path) -> None:
    data = b"\x00\x01old.example\x00binary"
    write(app / "blob.env", data)
    assert rewrite(app, SRC, DST, GLOBS) == []
    assert (app / "blob.env").read_bytes() == data


def test_never_follows_symlinks(app: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "secret.env", "old.example\n")
    write(outside / "dir" / ".env", "old.example\n")
    before = snapshot(outside)
    os.symlink(outside / "secret.env", app / ".env")
    os.symlink(outside / "secret.env", app / "linked.env")
    os.symlink(outside / "dir", app / "linked-dir")
    os.symlink("../../outside/secret.env", app / "docker-compose.yml")
    write(app / "real.env", "old.example\n")

    assert rewrite(app, SRC, DST, GLOBS) == ["real.env"]
    assert diff(snapshot(outside), before) == []
    assert os.readlink(app / ".env") == str(outside / "secret.env")
    assert os.readlink(app / "docker-compose.yml") == "../../outside/secret.env"


def test_skips_files_over_16_mib(app: Path) -> None:
    filler = b"#" * (MAX_FILE - len(b"old.example\n"))
    write(app / "exact.env", b"old.example\n" + filler)  # exactly 16 MiB: still rewritten
    write(app / "huge.env", b"old.example\n" + filler + b"\n")  # one byte over
    assert MAX_FILE == 16 << 20
    assert rewrite(app, SRC, DST, GLOBS) == ["exact.env"]
    assert (app / "exact.env").read_bytes().startswith(b"new.example\n")
    assert (app / "huge.env").read_bytes().startswith(b"old.example\n")


def test_unchanged_files_are_not_rewritten(app: Path) -> None:
    env = write(app / ".env", "DOMAIN=elsewhere.example\n")
    st_before = os.stat(env)
    assert rewrite(app, SRC, DST, GLOBS) == []
    st_after = os.stat(env)
    assert (st_after.st_ino, st_after.st_mtime_ns) == (st_before.st_ino, st_before.st_mtime_ns)


def test_glob_with_slash_matches_the_relative_path(app: Path) -> None:
    write(app / "config" / "app.yml", "old.example\n")
    write(app / "other" / "app.yml", "old.example\n")
    write(app / "config" / "deep" / "app.yml", "old.example\n")
    assert rewrite(app, SRC, DST, ("config/*.yml",)) == ["config/app.yml", "config/deep/app.yml"]
    assert (app / "other" / "app.yml").read_text() == "old.example\n"


def test_special_characters_in_the_source_are_literal(app: Path) -> None:
    write(app / ".env", "a=old-example b=old.example\n")
    assert rewrite(app, "old-example", "x.test", GLOBS) == [".env"]
    assert (app / ".env").read_text() == "a=x.test b=old.example\n"


_text = st.text(alphabet=st.characters(codec="ascii", exclude_characters="\x00"), max_size=200)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=_text, suffix=_text)
def test_rewrite_is_exactly_the_label_bounded_replacement(app: Path, prefix: str, suffix: str) -> None:
    """Around one clear occurrence, everything else is kept byte for byte."""
    text = f"{prefix} old.example {suffix}"
    write(app / ".env", text)
    rewrite(app, SRC, DST, GLOBS)
    out = (app / ".env").read_bytes().decode("ascii")  # bytes: no newline translation
    # The occurrence between spaces is always rewritten; nothing else changes
    # except other occurrences of the domain.
    if "old.example" not in prefix.lower() and "old.example" not in suffix.lower():
        assert out == f"{prefix} new.example {suffix}"
    else:
        assert " new.example " in out
        assert len(out) == len(text)


def test_memory_stays_flat_in_the_number_of_files(app: Path) -> None:
    """Only matching names are kept while walking (os.walk listed each directory whole: about 150 bytes a file)."""
    import tracemalloc

    def grown(files: int) -> int:
        root = app / f"n{files}"
        (root / "wide").mkdir(parents=True)
        for i in range(files):
            (root / "wide" / f"cache-entry-with-a-name-of-some-length-{i:06d}").touch()
        write(root / "wide" / ".env", f"URL=https://{SRC}/\n")
        tracemalloc.start()
        try:
            assert rewrite(root, SRC, DST, GLOBS) == ["wide/.env"]
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    few, many = grown(500), grown(20_000)
    assert many - few < 100_000, (few, many)




def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


_LEFT_ALONE = """
import sys
from pathlib import Path
from peerkit.urlrewrite import rewrite
print(rewrite(Path(sys.argv[1]), "old.example", "new.example", (".env",)))
"""


@pytest.mark.skipif(os.geteuid() == 0 and _nobody() is None, reason="no 'nobody' user to drop to")
def test_a_directory_that_cannot_be_listed_is_left_alone() -> None:
    """As under os.walk: a 0o000 directory (another user than root cannot list it) has nothing to rewrite."""
    base = Path(tempfile.mkdtemp(prefix="peerkit-rewrite-"))  # in /tmp: nobody can reach it
    try:
        os.chmod(base, 0o755)
        write(base / ".env", f"URL=https://{SRC}/\n")
        write(base / "shut" / ".env", f"URL=https://{SRC}/\n")
        nobody = _nobody() if os.geteuid() == 0 else None
        if nobody is not None:
            for p in (base, base / ".env", base / "shut", base / "shut" / ".env"):
                os.chown(p, nobody.pw_uid, nobody.pw_gid)
        os.chmod(base / "shut", 0)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-c", _LEFT_ALONE, str(base)], capture_output=True, text=True,
                             env=env, timeout=60, user=nobody.pw_uid if nobody else None,
                             group=nobody.pw_gid if nobody else None)
        assert out.stdout == "['.env']\n", (out.stdout, out.stderr)
    finally:
        os.chmod(base / "shut", 0o755)
        shutil.rmtree(base)


def test_deep_trees_are_walked_whole(app: Path) -> None:
    """Past listing.STREAMED_LEVELS a directory is listed whole instead of held open: the same files found."""
    depth = listing.STREAMED_LEVELS + 20
    expected = []
    for level in (0, 1, listing.STREAMED_LEVELS - 1, listing.STREAMED_LEVELS, depth):
        rel = "d/" * level + ".env"
        write(app / rel, f"URL=https://{SRC}/\n")
        expected.append(rel)
    write(app / ("d/" * depth) / "other.txt", f"URL=https://{SRC}/\n")
    assert rewrite(app, SRC, DST, GLOBS) == sorted(expected)
    assert fds_into(app) == []  # other tests' fds may close meanwhile: only the walk's count
    assert (app / ("d/" * depth) / ".env").read_text() == f"URL=https://{DST}/\n"
