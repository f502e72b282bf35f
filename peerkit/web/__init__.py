"""The web UI: a local admin page whose every action runs the peerkit CLI with --json.

Only ``peerkit web`` imports this package, so aiohttp never slows down the
CLI's other commands or peer-shell.  ``serve`` is the entry point; the
pieces are ``security`` (access token, CSRF, headers, bind rules),
``runner`` (the CLI as a subprocess), ``jobs`` (pulls with live progress)
and ``app`` (routes).
"""

from __future__ import annotations

from .app import serve

__all__ = ["serve"]
