"""This instance's ed25519 identity: our outbound SSH key and what peers authorize."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .atomicfile import fsync_dir, write_atomic
from .errors import IdentityError
from .keys import PublicKey, parse_public_key


def public_path(identity: Path) -> Path:
    """Return the path of the public half of an identity."""
    return identity.with_name(identity.name + ".pub")


def read_identity(identity: Path) -> PublicKey:
    """Read our public key; raise IdentityError if it is missing or malformed."""
    pub = public_path(identity)
    try:
        text = pub.read_text(encoding="ascii")
    except FileNotFoundError:
        raise IdentityError(f"no identity at {pub}; run `peerkit init`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read {pub}: {exc}") from None
    try:
        return parse_public_key(text)
    except ValueError as exc:
        raise IdentityError(f"{pub}: {exc}") from None


def ensure_identity(identity: Path, comment: str) -> tuple[PublicKey, bool]:
    """Return our public key, generating the key pair on first need."""
    pub = public_path(identity)
    if identity.exists() and pub.exists():
        _check_private_mode(identity)
        return read_identity(identity), False
    if identity.exists() or pub.exists():
        raise IdentityError(
            f"only one half of the key pair exists at {identity}; move it away or restore the other half")
    from .sshimport import asyncssh  # only key generation needs it; keep it off every other path

    identity.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(identity.parent, 0o700)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    # asyncssh's write_private_key follows the umask; the private key must
    # be 0600 from the instant it exists, so create it ourselves with O_EXCL.
    fd = os.open(identity, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.export_private_key())
            fh.flush()
            os.fsync(fh.fileno())
        write_atomic(pub, key.export_public_key(), mode=0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(identity)
        raise
    fsync_dir(identity.parent)
    return read_identity(identity), True


def _check_private_mode(identity: Path) -> None:
    mode = identity.stat().st_mode & 0o777
    # ssh itself refuses a private key others can read; say so before it does.
    if mode & 0o077:
        raise IdentityError(f"{identity} is mode {mode:04o}; run: chmod 600 {identity}")
