"""The web UI's HTTP side (aiohttp): access checks, static files, and a JSON API over the CLI.

Every action runs the peerkit CLI with --json (see ``runner``); this module
only checks who is asking, validates what the page sent, and relays the
CLI's answer.  The page itself (``static/``) builds its DOM with
textContent, so peer-supplied text is never parsed as HTML.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from aiohttp import web

from .. import __version__, grammar
from ..errors import PeerkitError
from . import security
from .jobs import PullJobs
from .runner import Cli

STATIC = Path(__file__).parent / "static"
_FILES = {
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
_MAX_BODY = 64 * 1024
_MAX_TOKEN = 4096
_KEEPALIVE = 15.0

Ready = Callable[[str, str, int], None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ACCESS = web.AppKey("access", str)
CSRF = web.AppKey("csrf", str)
LISTEN = web.AppKey("listen", str)
PORT = web.AppKey("port", int)
CLI = web.AppKey("cli", Cli)
JOBS = web.AppKey("jobs", PullJobs)
INSTANCE = web.AppKey("instance", str)


def _refuse(request: web.Request, reason: str) -> web.Response:
    if request.path.startswith("/api/"):
        return web.json_response({"ok": False, "error": "forbidden", "message": reason}, status=403)
    return web.Response(status=403, text=f"403 Forbidden: {reason}\n", content_type="text/plain")


def _bad(code: str, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": code, "message": message}, status=400)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admit only our own page's requests, with the access token, and for state changes the CSRF token."""
    app = request.app
    if not security.host_allowed(request.headers.get("Host"), app[LISTEN], app[PORT]):
        return _refuse(request, "unexpected Host header")
    cookie = security.cookie_name(app[PORT])
    offered = request.query.get("token")
    if offered is not None and request.method == "GET":
        if not security.same_secret(offered, app[ACCESS]):
            return _refuse(request, "wrong access token; use the address `peerkit web` printed")
        # Trade the token in the address for a cookie, then drop it from
        # the address bar (and from history, bookmarks and screenshots).
        # Always to "/": echoing the path could redirect to //elsewhere.
        response = web.Response(status=303, headers={"Location": "/"})
        # HttpOnly: page script never sees it; SameSite=Strict: other sites' requests never carry it.
        response.set_cookie(cookie, app[ACCESS], httponly=True, samesite="Strict", path="/")
        return response
    # Every request, static files included: nothing here is for someone without the token.
    if not security.same_secret(request.cookies.get(cookie), app[ACCESS]):
        return _refuse(request, "open the address `peerkit web` printed (it carries the access token)")
    if request.method in security.STATE_CHANGING:
        if not security.origin_allowed(request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site"),
                                       request.host):
            return _refuse(request, "cross-origin request")
        # A forged request from another page (even another port of this
        # host, which shares our cookie) cannot know the CSRF token.
        if not security.same_secret(request.headers.get(security.CSRF_HEADER), app[CSRF]):
            return _refuse(request, "missing or wrong CSRF token; reload the page")
    return await handler(request)


async def _headers(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in security.HEADERS.items():
        response.headers.setdefault(name, value)


def _reply(result: dict[str, Any]) -> web.Response:
    return web.json_response(result, dumps=lambda obj: json.dumps(obj, ensure_ascii=False))


async def _body(request: web.Request) -> dict[str, Any] | None:
    if request.content_type != "application/json":
        return None
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _peer_name(request: web.Request) -> str | None:
    name = request.match_info.get("name", "")
    return name if grammar.is_name(name) else None


async def index(request: web.Request) -> web.Response:
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    # The CSRF token is URL-safe base64: nothing to escape.
    html = html.replace("__CSRF_TOKEN__", request.app[CSRF])
    return web.Response(text=html, content_type="text/html", charset="utf-8")


async def static(request: web.Request) -> web.Response:
    name, content_type = _FILES[request.path]
    return web.Response(body=(STATIC / name).read_bytes(), headers={"Content-Type": content_type})


async def session(request: web.Request) -> web.Response:
    return _reply({"ok": True, "instance": request.app[INSTANCE], "version": __version__})


async def peers(request: web.Request) -> web.Response:
    return _reply((await request.app[CLI].run("peers")).to_json())


async def token(request: web.Request) -> web.Response:
    return _reply((await request.app[CLI].run("token")).to_json())


async def pair(request: web.Request) -> web.Response:
    body = await _body(request)
    if body is None:
        return _bad("usage", "send a JSON object")
    text, name = body.get("token"), body.get("name") or ""
    if not isinstance(text, str) or not text.strip():
        return _bad("not-a-token", "Paste the other instance's pairing token.")
    # Length cap and no NUL (an argv element cannot hold one); the CLI parses the rest strictly.
    if len(text) > _MAX_TOKEN or "\x00" in text:
        return _bad("not-a-token", "That is not a pairing token (too long or not text).")
    if not isinstance(name, str) or (name and not grammar.is_name(name)):
        return _bad("bad-name", "A peer name is 1-63 of a-z, 0-9 and '-', starting with a letter or digit.")
    args = ["pair", "--", text] + ([name] if name else [])
    return _reply((await request.app[CLI].run(*args)).to_json())


def _peer_command(verb: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        name = _peer_name(request)
        if name is None:
            return _bad("bad-name", "That peer name is not valid, so peerkit cannot act on it.")
        return _reply((await request.app[CLI].run(verb, "--", name)).to_json())
    return handler


async def start_pull(request: web.Request) -> web.Response:
    body = await _body(request)
    if body is None:
        return _bad("usage", "send a JSON object")
    peer, app = body.get("peer"), body.get("app")
    pre_backup, rewrite = body.get("pre_backup", True), body.get("rewrite_urls", True)
    if not grammar.is_name(peer):
        return _bad("bad-name", "That peer name is not valid.")
    if not grammar.is_slug(app):
        return _bad("bad-slug", "That app name is not valid.")
    if not isinstance(pre_backup, bool) or not isinstance(rewrite, bool):
        return _bad("usage", "pre_backup and rewrite_urls are true or false")
    job = await request.app[JOBS].start(peer, app, pre_backup=pre_backup, rewrite_urls=rewrite)
    return _reply({"ok": True, **job.to_json()})


async def pull_state(request: web.Request) -> web.Response:
    job = request.app[JOBS].get(request.match_info["job"])
    if job is None:
        return web.json_response({"ok": False, "error": "no-such-pull", "message": "no such pull"}, status=404)
    return _reply({"ok": True, **job.to_json()})


async def pull_events(request: web.Request) -> web.StreamResponse:
    """Stream a pull's progress and result as Server-Sent Events."""
    job = request.app[JOBS].get(request.match_info["job"])
    if job is None:
        return web.json_response({"ok": False, "error": "no-such-pull", "message": "no such pull"}, status=404)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    seen, sent_progress = -1, -1
    while True:
        version = await job.wait_change(seen, _KEEPALIVE)
        if version == seen:
            await response.write(b": keepalive\n\n")
            continue
        seen = version
        if job.progress is not None and job.progress_events != sent_progress:
            sent_progress = job.progress_events
            await response.write(_sse("progress", {"event": "progress", **job.progress}))
        if job.result is not None:
            await response.write(_sse("result", job.result))
            break
    return response


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def make_app(config: Path, instance: str, *, listen: str, port: int, access: str, csrf: str,
             command: Sequence[str] | None = None) -> web.Application:
    """Build the application for one instance (``port`` is the one actually bound)."""
    app = web.Application(middlewares=[guard], client_max_size=_MAX_BODY)
    app[ACCESS], app[CSRF], app[LISTEN], app[PORT], app[INSTANCE] = access, csrf, listen, port, instance
    app[CLI] = cli = Cli(config, command)
    app[JOBS] = PullJobs(cli)
    app.on_response_prepare.append(_headers)
    app.router.add_get("/", index)
    for path in _FILES:
        app.router.add_get(path, static)
    app.router.add_get("/api/session", session)
    app.router.add_get("/api/peers", peers)
    app.router.add_get("/api/token", token)
    app.router.add_post("/api/pair", pair)
    app.router.add_get("/api/peers/{name}/apps", _peer_command("apps"))
    app.router.add_get("/api/peers/{name}/verify", _peer_command("verify"))
    app.router.add_post("/api/peers/{name}/ping", _peer_command("ping"))
    app.router.add_delete("/api/peers/{name}", _peer_command("unpair"))
    app.router.add_post("/api/pulls", start_pull)
    app.router.add_get("/api/pulls/{job}", pull_state)
    app.router.add_get("/api/pulls/{job}/events", pull_events)

    async def stop_pulls(app: web.Application) -> None:
        await app[JOBS].stop()

    app.on_shutdown.append(stop_pulls)
    return app


def url_for(listen: str, port: int, access: str) -> str:
    """Return the address to open, with the access token (as Jupyter prints it)."""
    host = "127.0.0.1" if listen in ("0.0.0.0", "localhost") else listen
    host = "[::1]" if listen == "::" else (f"[{host}]" if ":" in host else host)
    return f"http://{host}:{port}/?token={access}"


async def serve(config: Path, instance: str, *, listen: str | None = None, port: int = 8765,
                ready: Ready | None = None, stop: asyncio.Event | None = None,
                command: Sequence[str] | None = None, access: str | None = None) -> None:
    """Serve the page until SIGINT/SIGTERM (or ``stop`` is set); ``listen`` None means loopback."""
    address = listen or security.DEFAULT_LISTEN
    security.check_listen(address, explicit=listen is not None)
    access = access or security.new_secret()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (RuntimeError, ValueError):
            pass  # not the main thread (tests): ``stop`` ends it
    # The bound port is only known after binding, and the Host check needs
    # it: bind a socket first, then hand it to aiohttp.
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise PeerkitError(f"cannot listen on {address}:{port}: {exc.strerror}") from None
    bound = sock.getsockname()[1]
    app = make_app(config, instance, listen=address, port=bound, access=access,
                   csrf=security.new_secret(), command=command)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        if ready is not None:
            ready(url_for(address, bound, access), address, bound)
        await stop.wait()
    finally:
        await runner.cleanup()
        sock.close()
