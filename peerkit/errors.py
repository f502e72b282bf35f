"""One error hierarchy for the whole library.

Every failure a user or a script can meet is a subclass of PeerkitError with
a stable machine ``code`` (what ``--json`` output and the web UI key on) and a
distinct process ``exit_code``.  The CLI's ``main()`` is the only place that
turns one into an exit status; the library only raises.

The docstring of each class is its default human message.  ``detail`` adds
context for the local operator; it is never sent to a remote peer.
"""

from __future__ import annotations


class PeerkitError(Exception):
    """peerkit failed."""

    code = "error"
    exit_code = 1

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        base = (self.__doc__ or self.code).strip().splitlines()[0]
        return f"{base.rstrip('.')}: {self.detail}" if self.detail else base

    def to_json(self) -> dict:
        return {"ok": False, "error": self.code, "message": self.message}


# -- configuration and local state (10-19) ---------------------------------

class ConfigError(PeerkitError):
    """The configuration is invalid."""

    code = "bad-config"
    exit_code = 10


class NotInitialized(PeerkitError):
    """This instance has no configuration yet; run `peerkit init`."""

    code = "not-initialized"
    exit_code = 11


class StateError(PeerkitError):
    """The peer database cannot be used."""

    code = "bad-state"
    exit_code = 12


class IdentityError(PeerkitError):
    """The identity key pair cannot be used."""

    code = "bad-identity"
    exit_code = 13


class AuthorizedKeysError(PeerkitError):
    """authorized_keys cannot be updated safely."""

    code = "authorized-keys"
    exit_code = 14


class Busy(PeerkitError):
    """Another peerkit process holds the lock."""

    code = "busy"
    exit_code = 15


class ProblemsFound(PeerkitError):
    """peerkit doctor found problems."""

    code = "problems-found"
    exit_code = 16


class PeersBehind(PeerkitError):
    """The key was rotated, but some peers still trust the retired key (or could not confirm the new one)."""

    code = "peers-behind"
    exit_code = 17


class NotLoopback(PeerkitError):
    """Refusing to serve the web UI beyond this machine without an explicit --listen."""

    code = "not-loopback"
    exit_code = 18


# -- pairing tokens (20-29) -----------------------------------------------

class TokenError(PeerkitError):
    """The pairing token is invalid."""

    code = "bad-token"
    exit_code = 20


class NotAToken(TokenError):
    """This is not a peerkit or LibrePortal pairing token."""

    code = "not-a-token"
    exit_code = 21


class UnsupportedVersion(TokenError):
    """The pairing token's version is not supported."""

    code = "unsupported-version"
    exit_code = 22


class FingerprintMismatch(TokenError):
    """The token's fingerprint does not match its key (truncated or tampered)."""

    code = "fingerprint-mismatch"
    exit_code = 23


class BadField(TokenError):
    """A field of the pairing token is out of its grammar."""

    code = "bad-field"
    exit_code = 24


class ChecksumMismatch(TokenError):
    """The token's check value does not match (mistyped or tampered)."""

    code = "checksum-mismatch"
    exit_code = 25


# -- peers (30-39) --------------------------------------------------------

class NoSuchPeer(PeerkitError):
    """No peer of that name is paired."""

    code = "no-such-peer"
    exit_code = 30


class PeerExists(PeerkitError):
    """A peer of that name is already paired with a different key; use --replace."""

    code = "peer-exists"
    exit_code = 31


class KeyInUse(PeerkitError):
    """That key is already authorized for another peer."""

    code = "key-in-use"
    exit_code = 32


class BadName(PeerkitError):
    """Invalid peer name: use 1-63 of a-z, 0-9 and '-', starting with a letter or digit."""

    code = "bad-name"
    exit_code = 33


class SelfPairing(PeerkitError):
    """That token is this instance's own."""

    code = "self-pairing"
    exit_code = 34


class BadPermission(PeerkitError):
    """The permission change is not valid."""

    code = "bad-permission"
    exit_code = 35


# -- talking to a peer (40-49) --------------------------------------------

class PeerUnreachable(PeerkitError):
    """The peer cannot be reached."""

    code = "peer-unreachable"
    exit_code = 40


class SessionRefused(PeerUnreachable):
    """The peer refused one more session (its limit of sessions per peer is reached)."""

    code = "session-refused"
    exit_code = 44


class HostKeyMismatch(PeerkitError):
    """The peer's SSH host key does not match the one pinned at pairing."""

    code = "host-key-mismatch"
    exit_code = 41


class PeerRefused(PeerkitError):
    """The peer refused the request."""

    code = "refused"
    exit_code = 42


class ProtocolError(PeerkitError):
    """The peer answered with something peerkit does not understand."""

    code = "bad-response"
    exit_code = 43


# -- transfers (50-59) ----------------------------------------------------

class NoSuchApp(PeerkitError):
    """No app of that name."""

    code = "no-such-app"
    exit_code = 50


class BadSlug(PeerkitError):
    """Invalid app name: use 1-63 of a-z, 0-9 and '-', starting with a letter or digit."""

    code = "bad-slug"
    exit_code = 51


class TransferIncomplete(PeerkitError):
    """The transfer did not complete; the local app is unchanged."""

    code = "transfer-incomplete"
    exit_code = 52


class UnsafeArchive(PeerkitError):
    """The peer sent an unsafe archive; the local app is unchanged."""

    code = "unsafe-archive"
    exit_code = 53


class BackupFailed(PeerkitError):
    """The pre-backup failed; nothing was changed."""

    code = "backup-failed"
    exit_code = 54


class HookFailed(PeerkitError):
    """A hook failed."""

    code = "hook-failed"
    exit_code = 55

    def __init__(self, detail: str | None = None, runs: list | None = None) -> None:
        super().__init__(detail)
        self.runs = runs or []


class AppBusy(PeerkitError):
    """Another transfer of this app is running."""

    code = "busy"
    exit_code = 56


class StreamFailed(PeerkitError):
    """Sending the app's archive failed."""

    code = "failed"
    exit_code = 57


class NoSpace(PeerkitError):
    """Not enough free disk space for the transfer; nothing was changed."""

    code = "no-space"
    exit_code = 58


class AgentSocket(PeerkitError):
    """The agent's socket cannot be used safely."""

    code = "agent-socket"
    exit_code = 60


class AgentLost(PeerkitError):
    """The agent stopped before the command finished; its outcome is unknown (see the agent's log)."""

    code = "agent-lost"
    exit_code = 61


class Interrupted(PeerkitError):
    """Interrupted; the local app is unchanged or was restored."""

    code = "interrupted"
    exit_code = 130


def all_errors() -> list[type[PeerkitError]]:
    """Return every error class, root first (used by the README table test)."""
    out: list[type[PeerkitError]] = []
    todo: list[type[PeerkitError]] = [PeerkitError]
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out
