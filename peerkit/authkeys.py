"""authorized_keys: render peerkit's key lines and edit the file without harm.

peerkit owns exactly the lines whose key comment is ``peerkit:<peer-name>``.
Every other line (comments, blank lines, other tools' keys, options, a
missing final newline) is kept byte for byte.  Edits are read-modify-write
cycles under an exclusive lock, written atomically, mode 0600.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .atomicfile import locked, read_bytes, write_atomic
from .errors import AuthorizedKeysError
from .keys import PublicKey

COMMENT_PREFIX = "peerkit:"
_KEY_TYPE = re.compile(
    r"(ssh-ed25519|ssh-rsa|ssh-dss|ecdsa-sha2-nistp(?:256|384|521)"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com|sk-ssh-ed25519@openssh\.com)"
    r"(?:-cert-v01@openssh\.com)?", re.ASCII)
_SAFE_ARG = re.compile(r"[A-Za-z0-9_./+@%,:-]+", re.ASCII)


@dataclass(frozen=True)
class KeyLine:
    """One parsed authorized_keys entry."""

    options: str
    kind: str
    b64: str
    comment: str

    @property
    def peer(self) -> str | None:
        """Return the peer name if this is one of peerkit's lines."""
        if self.comment.startswith(COMMENT_PREFIX):
            return self.comment[len(COMMENT_PREFIX):]
        return None


def render_line(peer: str, key: PublicKey, peer_shell: Path, config_path: Path,
                extra_options: tuple[str, ...] = ()) -> str:
    """Return the authorized_keys line that lets ``peer`` run only peer-shell."""
    command = f"{peer_shell} --config {config_path} {peer}"
    # sshd hands command= to the login shell: every word must be free of
    # anything a shell interprets, and of the '"' that would end the option.
    # Check the parts, not the split command: a path with a space would
    # otherwise pass as two harmless words and become two arguments.
    for word in (str(peer_shell), str(config_path), peer):
        if not _SAFE_ARG.fullmatch(word):
            raise AuthorizedKeysError(
                f"{word!r} cannot be used in a forced command: use a path of letters, digits and '_./+@%,:-'")
    # restrict = no-pty, no-port-forwarding, no-X11-forwarding,
    # no-agent-forwarding, no-user-rc and whatever sshd restricts in future.
    options = ",".join(("restrict", *extra_options, f'command="{command}"'))
    return f"{options} {key.kind} {key.b64} {COMMENT_PREFIX}{peer}"


def _split_options(line: str) -> tuple[str, str]:
    """Split a line into (options, rest) the way sshd does."""
    if _KEY_TYPE.match(line) and line[_KEY_TYPE.match(line).end():][:1] in (" ", "\t"):
        return "", line
    quoted = False
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and quoted and line[i + 1:i + 2] == '"':
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch in " \t" and not quoted:
            return line[:i], line[i:].lstrip(" \t")
        i += 1
    return line, ""


def parse_line(line: str) -> KeyLine | None:
    """Parse one line; return None for blanks, comments and unparseable lines."""
    text = line.rstrip("\r").strip(" \t")
    if not text or text.startswith("#"):
        return None
    options, rest = _split_options(text)
    fields = rest.split(None, 2)
    if len(fields) < 2 or not _KEY_TYPE.fullmatch(fields[0]):
        return None
    return KeyLine(options, fields[0], fields[1], fields[2] if len(fields) == 3 else "")


class AuthorizedKeys:
    """The file as a list of line texts, remembering whether it ended with a newline."""

    def __init__(self, text: str) -> None:
        self.trailing_newline = text.endswith("\n") or not text
        body = text[:-1] if text.endswith("\n") else text
        # A file holding only "\n" is one blank line, not an empty file.
        self.lines: list[str] = body.split("\n") if text else []

    def render(self) -> str:
        """Return the file text; untouched lines come back byte for byte."""
        if not self.lines:
            return ""
        return "\n".join(self.lines) + ("\n" if self.trailing_newline else "")

    def entries(self) -> list[tuple[int, KeyLine]]:
        """Return (index, entry) for every key line in the file."""
        out = []
        for i, line in enumerate(self.lines):
            entry = parse_line(line)
            if entry is not None:
                out.append((i, entry))
        return out

    def peers(self) -> dict[str, KeyLine]:
        """Return peerkit's own entries by peer name."""
        return {e.peer: e for _, e in self.entries() if e.peer is not None}

    def find_peer(self, peer: str) -> int | None:
        """Return the index of ``peer``'s line, or None."""
        for i, entry in self.entries():
            if entry.peer == peer:
                return i
        return None

    def set_peer(self, peer: str, line: str) -> str:
        """Add or replace ``peer``'s line; return 'added', 'replaced' or 'unchanged'."""
        index = self.find_peer(peer)
        if index is None:
            self.lines.append(line)
            return "added"
        if self.lines[index] == line:
            return "unchanged"
        self.lines[index] = line
        return "replaced"

    def remove_peer(self, peer: str) -> bool:
        """Remove every line of ``peer``; return whether one was there."""
        keep = [line for line in self.lines
                if (entry := parse_line(line)) is None or entry.peer != peer]
        removed = len(keep) != len(self.lines)
        self.lines = keep
        return removed


def import_authorized_keys(text: str) -> AuthorizedKeys:
    """Parse authorized_keys text."""
    return AuthorizedKeys(text)


def read_authorized_keys(path: Path) -> AuthorizedKeys:
    """Read authorized_keys (a missing file is an empty one)."""
    data = read_bytes(path)
    try:
        return import_authorized_keys((data or b"").decode("utf-8", "surrogateescape"))
    except UnicodeDecodeError as exc:  # pragma: no cover - surrogateescape never fails
        raise AuthorizedKeysError(f"{path}: {exc}") from None


def write_authorized_keys(path: Path, keys: AuthorizedKeys) -> None:
    """Write authorized_keys atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, keys.render().encode("utf-8", "surrogateescape"), mode=0o600)


def lock(path: Path):
    """Return the context manager that serialises edits of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return locked(path)


def fix_mode(path: Path) -> None:
    """Make sure authorized_keys is not group or world writable (StrictModes)."""
    if path.exists():
        os.chmod(path, 0o600)
