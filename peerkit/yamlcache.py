"""Remember the parsed form of the config file, so peer-shell need not import a YAML parser.

sshd starts peer-shell for every SSH call, and importing PyYAML alone takes
about as long as everything else peer-shell does for a ``ping``.  After a
successful parse, the document is stored as JSON beside the config
(``.<name>.parsed.json``) together with the exact text it came from.  A
later read uses it only when that text equals the file's current text byte
for byte, so the cache can never say anything the file does not: it is a
memo of a pure function, not a second source of configuration.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable

from . import __version__

# A cache far larger than the text it describes is not ours.
_MAX_OVERHEAD = 64 << 10
_MISS = object()


def cache_path(config_path: Path) -> Path:
    """Return where the parsed form of ``config_path`` is kept."""
    return config_path.with_name(f".{config_path.name}.parsed.json")


def load(config_path: Path, text: str, parse: Callable[[str], Any]) -> Any:
    """Return ``parse(text)``, from the cache when it holds exactly ``text``."""
    found = _read(cache_path(config_path), text)
    if found is not _MISS:
        return found
    data = parse(text)
    # Only plain JSON values survive a round trip unchanged (no dates,
    # sets, bytes or non-string keys): anything else is parsed every time.
    if _plain(data):
        _write(cache_path(config_path), {"peerkit": __version__, "text": text, "data": data})
    return data


def _read(path: Path, text: str) -> Any:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return _MISS
    try:
        st = os.fstat(fd)
        # Only a private regular file of our own: in a shared (sticky)
        # directory another user could plant one next to our config.
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022
                or st.st_size > 4 * len(text) + _MAX_OVERHEAD):
            return _MISS
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read()
    except OSError:
        return _MISS
    finally:
        os.close(fd)
    try:
        cached = json.loads(raw)
    except ValueError:
        return _MISS  # torn or foreign: parse the file instead
    if (not isinstance(cached, dict) or cached.get("peerkit") != __version__
            or cached.get("text") != text or "data" not in cached):
        return _MISS
    return cached["data"]


def _write(path: Path, record: dict) -> None:
    """Store ``record`` best effort: a read-only config directory just means no cache."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh, ensure_ascii=True)
        os.replace(tmp, path)
    except (OSError, ValueError):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _plain(value: Any) -> bool:
    """Tell whether ``value`` is made only of JSON types (str keys, finite floats)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False
