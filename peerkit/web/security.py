"""The web UI's access rules, as pure functions: bind address, Host, token, Origin.

aiohttp is not imported here, so every rule is tested on its own.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets

from ..errors import NotLoopback

DEFAULT_LISTEN = "127.0.0.1"
COOKIE_PREFIX = "peerkit-web-"
CSRF_HEADER = "X-CSRF-Token"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# Sent with every response, errors and static files included.
HEADERS = {
    # No inline script or style, nothing from elsewhere: injected markup cannot run or phone home.
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                                "base-uri 'none'"),
    # A response is never re-read as another type (a JSON answer as script).
    "X-Content-Type-Options": "nosniff",
    # The page is never framed (clickjacking of Unpair or Pull).
    "X-Frame-Options": "DENY",
    # The access token in the first URL never leaks to another site.
    "Referrer-Policy": "no-referrer",
    # Other origins cannot embed our responses or script our window.
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Tokens and peer lists are never kept in a cache.
    "Cache-Control": "no-store",
}


def new_secret() -> str:
    """Return a fresh random secret for the access or the CSRF token."""
    return secrets.token_urlsafe(32)


def same_secret(given: str | None, expected: str) -> bool:
    """Compare a presented secret in constant time (timing reveals nothing of it)."""
    if not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("ascii"))


def is_loopback(address: str) -> bool:
    """Tell whether ``address`` is a loopback address (or ``localhost``)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_listen(address: str, *, explicit: bool) -> None:
    """Refuse a non-loopback bind unless the operator named the address."""
    # The page can unpair peers and replace apps: it stays on this machine
    # unless someone asked for more in so many words.
    if not is_loopback(address) and not explicit:
        raise NotLoopback(f"{address}; pass --listen {address} to serve it there on purpose")


def split_host(host: str) -> tuple[str, int | None] | None:
    """Split a Host header into (name, port); None when malformed."""
    if not host or len(host) > 300:
        return None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        name, rest = host[1:end], host[end + 1:]
    else:
        name, _, port_text = host.rpartition(":")
        if not name:
            name, rest = host, ""
        else:
            rest = ":" + port_text
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and rest[1:].isascii()):
        return None
    return name.lower(), int(rest[1:]) if rest else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str | None, listen: str, port: int) -> bool:
    """Tell whether a request's Host header names the address we serve on."""
    # DNS rebinding: a hostile site points its own name at 127.0.0.1 and
    # calls us from its origin; its requests carry its name in Host.
    parts = split_host(host or "")
    if parts is None or parts[1] != port:
        return False
    name = parts[0]
    if listen in ("0.0.0.0", "::"):
        # Any address of this host: IP literals cannot be rebound, names can.
        return name == "localhost" or _is_ip(name)
    if is_loopback(listen):
        return name == "localhost" or (_is_ip(name) and ipaddress.ip_address(name) == _loopback_ip(listen))
    return name == listen.lower() or (_is_ip(name) and _is_ip(listen)
                                      and ipaddress.ip_address(name) == ipaddress.ip_address(listen))


def _loopback_ip(listen: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address("127.0.0.1" if listen == "localhost" else listen)


def origin_allowed(origin: str | None, fetch_site: str | None, host: str) -> bool:
    """Tell whether a state-changing request comes from our own page."""
    # Cross-site request forgery, also from another port of 127.0.0.1,
    # which browsers count as the same site: the browser names the origin.
    if fetch_site is not None and fetch_site != "same-origin":
        return False
    if origin is not None and origin != f"http://{host}":
        return False
    return True


def cookie_name(port: int) -> str:
    """Name the access cookie after the port: two pages on one host keep their own."""
    return f"{COOKIE_PREFIX}{port}"
