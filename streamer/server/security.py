"""Who may reach the server: the Host and Origin checks and CORS, in front of every route.

A browser lets any web page open a WebSocket to ``127.0.0.1`` or send it a ``POST``; the
only mark of the page is the ``Origin`` header. A page on a hostile name that its DNS
points at ``127.0.0.1`` (DNS rebinding) is even *same-origin* with the server, but its
requests carry that name in ``Host``. So, before any route runs (and for a WebSocket before
the upgrade, as an HTTP 403):

- **Host.** When the server listens on a loopback address only, a request whose ``Host``
  names anything but ``localhost``, a loopback address or a name in ``allowed_hosts`` is
  refused. Setting ``allowed_hosts`` turns the check on for any bind address. Otherwise (a
  server on a LAN, reached by whatever IP or name the network gives it) Host is not
  checked: tokens protect such a server, and start-up warns when there are none.
- **Origin.** A request with an ``Origin`` is refused unless that origin is listed in
  ``allowed_origins`` (``*``: any) or is the server's own: ``http://`` (``https://`` under
  TLS) followed by the request's ``Host``, which the check above has vouched for. A page
  served by streamer itself (the dashboard) is on that origin. Requests without ``Origin``
  come from programs, not pages, and pass. This covers every method: browsers do not send
  ``Origin`` on plain ``GET``s of images or scripts, and a page has no business calling
  streamer's HTTP APIs unless it is listed. ``Origin: null`` (sandboxed frames, ``file://``
  pages) is never the server's own.
- **CORS.** Listed origins get CORS grants (Starlette's ``CORSMiddleware``), preflights
  included; any other origin's preflight is refused with the rest of its requests.

Behind a reverse proxy the server sees the proxy's ``Host`` and scheme as it forwards them
(uvicorn applies ``X-Forwarded-Proto`` from proxies on 127.0.0.1): list the public name in
``allowed_hosts`` and the public origin in ``allowed_origins`` when they differ.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from streamer.config import ServerConfig, host_name, is_loopback_name, serialized_origin

log = logging.getLogger(__name__)

#: The ``scope["scheme"]`` of a WebSocket handshake -> the scheme of the page's origin.
_PAGE_SCHEME = {"ws": "http", "wss": "https"}


@dataclass(frozen=True)
class AccessPolicy:
    """The Host and Origin rules of one server (see the module's docstring)."""

    check_hosts: bool
    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str]

    @classmethod
    def of(cls, cfg: ServerConfig) -> AccessPolicy:
        return cls(
            check_hosts=cfg.binds_loopback or bool(cfg.allowed_hosts),
            allowed_hosts=frozenset(cfg.allowed_hosts),
            allowed_origins=frozenset(cfg.allowed_origins),
        )

    def host_allowed(self, host: str | None) -> bool:
        """A ``Host`` header this server answers (None: no header, not a browser)."""
        if not self.check_hosts or host is None:
            return True
        name = host_name(host)
        return name is not None and (is_loopback_name(name) or name in self.allowed_hosts)

    def origin_allowed(self, origin: str | None, scheme: str, host: str | None) -> bool:
        """Whether a request with this ``Origin`` may proceed; ``scheme`` and ``host`` are the
        request's own (``scope["scheme"]`` and a ``Host`` that passed :meth:`host_allowed`)."""
        if origin is None or "*" in self.allowed_origins:
            return True
        page = serialized_origin(origin)
        if page is None:
            return False
        return page in self.allowed_origins or page == own_origin(scheme, host)

    def refusal(self, scope: Scope) -> tuple[str, str] | None:
        """``(reason, message)`` when the request must be refused, else None."""
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.host_allowed(host):
            return "host", f"Host {host!r} is not served here (server.allowed_hosts lists the names that are)"
        origin = headers.get("origin")
        if not self.origin_allowed(origin, scope["scheme"], host):
            return "origin", f"Origin {origin!r} is not allowed (server.allowed_origins lists the ones that are)"
        return None


def own_origin(scheme: str, host: str | None) -> str | None:
    """The origin of a page the server itself served on this request's scheme and ``Host``."""
    if host is None:
        return None
    return serialized_origin(f"{_PAGE_SCHEME.get(scheme, scheme)}://{host}")


class AccessControl:
    """ASGI middleware: answers a request the :class:`AccessPolicy` refuses with 403 (for a
    WebSocket, an HTTP 403 instead of the upgrade) and calls ``on_refused(reason)``; passes
    everything else on untouched."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy, on_refused: Callable[[str], None]) -> None:
        self.app = app
        self.policy = policy
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self.policy.refusal(scope) if scope["type"] in ("http", "websocket") else None
        if refused is None:
            await self.app(scope, receive, send)
            return
        reason, message = refused
        log.warning("refused %s %r: %s", scope["type"], scope["path"], message)
        self.on_refused(reason)
        # Starlette sends a response on a WebSocket scope as the handshake's HTTP answer.
        await PlainTextResponse(message + "\n", status_code=403)(scope, receive, send)


def token_ok(tokens: Sequence[SecretStr], given: str | None) -> bool:
    """``given`` is one of ``tokens``. Compared against every token in constant time, so
    timing says nothing about which one nearly matched."""
    if not given:
        return False
    results = [hmac.compare_digest(given.encode(), t.get_secret_value().encode()) for t in tokens]
    return any(results)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    scheme, _, value = (authorization or "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def access_middleware(cfg: ServerConfig, on_refused: Callable[[str], None]) -> list[Middleware]:
    """The middleware that applies ``cfg``'s access rules, outermost first."""
    middleware = [Middleware(AccessControl, policy=AccessPolicy.of(cfg), on_refused=on_refused)]
    if cfg.allowed_origins:
        # Listed origins are trusted as much as the server's own pages: any method and header.
        # Tokens travel in headers or messages, not cookies, so no credentials mode is needed.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=cfg.allowed_origins,
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["Location", "ETag"],  # a WHIP client on another origin reads its session URL
                allow_private_network=True,
            )
        )
    return middleware


def token_valid(cfg: ServerConfig, token: str | None) -> bool:
    """Whether ``token`` is one of the server's tokens (constant time: compared with each)."""
    return token_ok(cfg.tokens, token)


def bearer_token_ok(cfg: ServerConfig, authorization: str | None) -> bool:
    """Whether a request may proceed: no tokens are set, or it carries ``Bearer <a token>``."""
    return not cfg.tokens or token_ok(cfg.tokens, bearer_token(authorization))


def startup_warnings(cfg: ServerConfig) -> list[str]:
    """What an operator must hear before trusting this configuration (empty when nothing)."""
    if cfg.tokens:
        return []
    warnings = []
    if not cfg.binds_loopback:
        warnings.append(
            f"listening on {cfg.host}, which is not a loopback address, with no access tokens: anyone who can "
            "reach it can watch every stream and ask questions, and so can a web page through DNS rebinding "
            "unless server.allowed_hosts lists this server's names. Set server.tokens (--token or STREAMER_TOKENS)."
        )
    if "*" in cfg.allowed_origins:
        warnings.append(
            "server.allowed_origins is '*' with no access tokens: any web page open in a browser that can reach "
            "this server can watch every stream and ask questions. List the origins you use, or set server.tokens."
        )
    return warnings
