"""Fixtures for tests that go through a real OpenSSH sshd (see tests/support/sshd.py).

One sshd and a handful of throwaway users serve the whole session.  The
users are created before sshd starts because its AllowUsers lists exactly
them.  Instances are created lazily, each owned by its own user:

* ``alpha`` / ``beta``: paired both ways; the shared, non-destructive pair.
* ``fresh_instance(role)``: an instance on a user of its own (``gamma``,
  ``delta``, ``epsilon``) for tests that unpair or damage state.
* ``pull-src`` / ``pull-dst`` and ``ping-src`` / ``ping-dst``: users that
  tests/integration/test_pull.py builds private instance pairs on (never
  registered with ``make_instance``: their key lines may run a stand-in for
  peer-shell, which writes no audit line).
* ``control_login``: a user whose key line has a forced command but no
  ``restrict``, to show that this sshd really grants what peerkit's lines
  are refused (so each refusal is the key line's doing, not the server's).

Every test that uses these fixtures runs twice, once per server kind
(``server_kind``, ids ``sshd`` and ``serve``), so every refusal proven
under OpenSSH is proven under the embedded server too:

* ``sshd``: one private OpenSSH sshd for every instance (``Sshd``).
* ``serve``: each instance runs its own `peerkit serve` as its owner, on a
  port of its own (``EmbeddedServer``); a fresh set of users, so nothing of
  the sshd run leaks into it.

A test that inspects what only OpenSSH has (its log, ``sshd -T``, the
unrestricted control key line) says so with ``@pytest.mark.servers("sshd")``
and a reason; tests that only hold under one kind of server branch on
``instance.server.kind``.

Without root or without /usr/sbin/sshd the tests skip, except under
``CI=true`` where that is a failure: CI must never go green by skipping.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import sshd as harness
from tests.support import ci


# Every user the session may need: sshd's AllowUsers is fixed at start.
# "control" has no peerkit instance: it holds a key line without `restrict`.
ROLES = ("alpha", "beta", "gamma", "delta", "epsilon", "control",
         "pull-src", "pull-dst", "ping-src", "ping-dst")
PEER_NAMES = {role: f"site-{role}" for role in ROLES if role != "control"}
SERVER_KINDS = ("sshd", "serve")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "servers(*kinds, reason): run only under these server kinds (default: sshd and serve)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test that reaches ``server_kind`` over the server kinds (session scope)."""
    if "server_kind" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("servers")
    kinds = list(marker.args) if marker else list(SERVER_KINDS)
    assert kinds and set(kinds) <= set(SERVER_KINDS), kinds
    if marker:
        assert marker.kwargs.get("reason"), f"{metafunc.definition.nodeid}: @servers needs a reason"
    metafunc.parametrize("server_kind", kinds, indirect=True, scope="session", ids=kinds)


def unavailable(reason: str) -> None:
    ci.unavailable("integration tests (root and OpenSSH)", reason)


@pytest.fixture(scope="session")
def harness_root() -> Path:
    """The 0755 temporary root under /tmp that holds sshd's files and the users' homes."""
    problems = harness.missing_prerequisites()
    if problems:
        unavailable("; ".join(problems))
    root = harness.make_root()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The bin/ of the virtualenv running the tests: its peerkit and peer-shell are the ones tested."""
    bin_dir = harness.venv_bin()
    missing = [name for name in ("peerkit", "peer-shell") if not (bin_dir / name).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found in {bin_dir}: install peerkit into the test "
                    f"virtualenv (pip install -e .)", pytrace=False)
    return bin_dir


@pytest.fixture(scope="session")
def server_kind(request: pytest.FixtureRequest) -> str:
    """"sshd" or "serve": which server the instances are reached through (see pytest_generate_tests)."""
    return request.param


@pytest.fixture(scope="session")
def users(harness_root: Path, venv_bin: Path, server_kind: str) -> dict[str, harness.ThrowawayUser]:
    """One throwaway account per role (per server kind), deleted with its home at the end."""
    created: dict[str, harness.ThrowawayUser] = {}
    try:
        for role in ROLES:
            created[role] = harness.ThrowawayUser.create(harness_root)
        problem = harness.check_runs_as(created[ROLES[0]], venv_bin / "peer-shell")
        if problem:
            pytest.fail(problem, pytrace=False)
        yield created
    finally:
        errors = []
        for user in created.values():
            try:
                user.delete()
            except harness.HarnessError as exc:
                errors.append(str(exc))
        if errors:
            raise harness.HarnessError("; ".join(errors))


class Servers:
    """The server each role's instance is reached through, for one server kind."""

    def __init__(self, kind: str, workdir: Path, users: dict[str, harness.ThrowawayUser],
                 bin_dir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.users = users
        self.bin_dir = bin_dir
        self.sshd: harness.Sshd | None = None
        self.embedded: dict[str, harness.EmbeddedServer] = {}
        if kind == "sshd":
            self.sshd = harness.Sshd(workdir, [user.name for user in users.values()])
            self.sshd.start()

    @property
    def known_hosts_path(self) -> Path:
        return self.sshd.known_hosts_path if self.sshd else self.workdir / "known_hosts"

    def for_role(self, role: str) -> harness.Sshd | harness.EmbeddedServer:
        """The shared sshd, or a `peerkit serve` of the role's own (started by PeerkitInstance.init)."""
        if self.sshd is not None:
            return self.sshd
        if role not in self.embedded:
            self.embedded[role] = harness.EmbeddedServer(self.workdir, self.users[role],
                                                         known_hosts_path=self.known_hosts_path,
                                                         bin_dir=self.bin_dir)
        return self.embedded[role]

    def stop(self) -> None:
        if self.sshd is not None:
            self.sshd.stop()
        for server in self.embedded.values():
            server.stop()


@pytest.fixture(scope="session")
def servers(harness_root: Path, users: dict[str, harness.ThrowawayUser], venv_bin: Path,
            server_kind: str) -> Servers:
    """The session's servers on 127.0.0.1 for this kind, stopped at the end (before the users go)."""
    try:
        made = Servers(server_kind, harness_root / server_kind, users, venv_bin)
    except harness.HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield made
    made.stop()


@pytest.fixture(scope="session")
def sshd(servers: Servers) -> harness.Sshd:
    """The private OpenSSH sshd; only for tests marked ``@pytest.mark.servers("sshd", reason=...)``."""
    if servers.sshd is None:
        pytest.fail("this test uses the OpenSSH sshd itself: mark it @pytest.mark.servers('sshd', reason=...) "
                    "or use instance.server", pytrace=False)
    return servers.sshd


@pytest.fixture(scope="session")
def make_instance(users, servers, venv_bin):
    """Return role -> initialised PeerkitInstance (created once per role, owned by its user)."""
    made: dict[str, harness.PeerkitInstance] = {}

    def make(role: str) -> harness.PeerkitInstance:
        if role not in made:
            made[role] = harness.PeerkitInstance(users[role], PEER_NAMES[role], servers.for_role(role),
                                                 venv_bin).init()
        return made[role]

    make.made = made  # type: ignore[attr-defined]
    return make


@pytest.fixture(scope="session")
def alpha(make_instance) -> harness.PeerkitInstance:
    return make_instance("alpha")


@pytest.fixture(scope="session")
def beta(make_instance) -> harness.PeerkitInstance:
    return make_instance("beta")


@pytest.fixture(scope="session")
def beta_token(beta) -> str:
    """B's pairing token (`peerkit token` as B), for the tests that pair it on a fresh instance."""
    return beta.token()


@pytest.fixture(scope="session")
def paired(alpha, beta) -> tuple[harness.PeerkitInstance, harness.PeerkitInstance]:
    """(A, B) after B's token was paired on A and A's token on B."""
    harness.pair_both_ways(alpha, beta)
    return alpha, beta


@pytest.fixture(scope="session")
def fresh_instance(make_instance):
    """Return role -> an unpaired instance for one destructive test; a role can be claimed once."""
    claimed: set[str] = set()

    def claim(role: str) -> harness.PeerkitInstance:
        if role not in ("gamma", "delta", "epsilon") or role in claimed:
            raise AssertionError(f"instance role {role!r} is not free: give the test a role of its own")
        claimed.add(role)
        return make_instance(role)

    return claim


@pytest.fixture(scope="session")
def control_login(harness_root: Path, users, sshd) -> tuple[harness.ThrowawayUser, Path]:
    """(user, private key) whose authorized_keys line is `command="/bin/cat"` without `restrict` (sshd only)."""
    user = users["control"]
    key = harness_root / f"control-key-{user.name}"
    harness.run_root(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "control", "-f", str(key)])
    public = key.with_name(key.name + ".pub").read_text(encoding="ascii").strip()
    user.run(["mkdir", "-p", "-m", "700", str(user.home / ".ssh")], check=True)
    user.write_file(user.home / ".ssh" / "authorized_keys",
                    f'command="/bin/cat" {public}\n'.encode("ascii"), mode=0o600)
    return user, key
