"""Issue 18 over real loopback sockets: who may reach the server. A foreign web page (its
``Origin``) and a DNS-rebinding page (its ``Host``) are refused on every route with the
default settings; the server's own pages, programs that send no ``Origin``, and the origins
and hosts an operator lists are served."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from streamer.cli import build_parser, settings_from_args
from streamer.config import DEMO_CONFIG, ConfigError, ServerConfig, parse_settings
from streamer.server.security import AccessPolicy, own_origin, startup_warnings
from tests.conftest import ServerProcess, start_server, stop_server
from tests.inproc import InProcessServer

pytestmark = pytest.mark.slow

EVIL = "http://evil.example"
DEMO = {
    "sources": [{"name": "demo", "url": "demo", "sample_fps": 4, "max_side": 320}],
    "model": {"id": "tiny-random", "frames": 2, "max_new_tokens": 4},
}
ROUTES = [("GET", "/"), ("GET", "/app.js"), ("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/healthz")]
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


def _http(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """One request over a fresh loopback connection; ``headers`` may set ``Host``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _ws(port: int, host: str | None = None, origin: str | None = None) -> int:
    """101 once a ``welcome`` arrived, else the HTTP status that refused the handshake. The
    socket goes to 127.0.0.1 whatever ``host`` (the ``Host`` header) names, as after DNS rebinding."""

    async def handshake() -> int:
        try:
            async with websockets.connect(
                f"ws://{host or f'127.0.0.1:{port}'}/ws", host="127.0.0.1", port=port, origin=origin, open_timeout=10
            ) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
                return 101
        except websockets.InvalidStatus as refused:
            return refused.response.status_code

    return asyncio.run(handshake())


def _refused(port: int, reason: str) -> float:
    _, _, body = _http(port, "GET", "/metrics", {})
    match = re.search(rf'streamer_connections_refused_total\{{reason="{reason}"\}} ([\d.]+)', body.decode())
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def demo(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`streamer demo` with its default settings, the setup the issue was found with."""
    server = start_server([], tmp_path_factory.mktemp("demo") / "server.log", command="demo")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def listed(tiny_model: Path) -> Iterator[InProcessServer]:
    """A server that lists one extra origin and one extra host name."""
    server = InProcessServer(
        {**DEMO, "server": {"allowed_origins": ["https://dash.example"], "allowed_hosts": ["cam.lan"]}}
    ).start(min_frames=2)
    yield server
    server.stop()


def test_foreign_origin_websocket_is_refused_with_403(demo: ServerProcess) -> None:
    """With default settings a handshake from another site's page (or an opaque ``null`` one) gets HTTP 403."""
    before = _refused(demo.port, "origin")
    assert _ws(demo.port, origin=EVIL) == 403
    assert _ws(demo.port, origin="null") == 403
    assert _refused(demo.port, "origin") == before + 2
    assert "origin 'http://evil.example' is not allowed" in demo.log().lower()


def test_foreign_origin_gets_no_cors_grant_over_http(demo: ServerProcess) -> None:
    """A foreign Origin gets 403 and no CORS header on every HTTP route, preflights and POSTs included."""
    for method, path in [*ROUTES, ("OPTIONS", "/healthz")]:
        headers = {"Origin": EVIL, **(PREFLIGHT if method == "OPTIONS" else {})}
        status, response_headers, body = _http(demo.port, method, path, headers)
        assert status == 403, (method, path)
        assert not any(h.startswith("access-control-") for h in response_headers), (method, path)
        assert b"server.allowed_origins" in body


def test_other_local_pages_are_foreign(demo: ServerProcess) -> None:
    """Pages on the same machine but another port or scheme are not the server's own origin."""
    for origin in (f"http://127.0.0.1:{demo.port + 1}", f"https://127.0.0.1:{demo.port}", "http://127.0.0.1"):
        assert _ws(demo.port, origin=origin) == 403, origin
        assert _http(demo.port, "POST", "/healthz", {"Origin": origin})[0] == 403, origin


def test_own_origin_and_programs_without_origin_are_served(demo: ServerProcess) -> None:
    """The server's own pages (Origin = http:// + Host) and clients without Origin reach every route."""
    assert _ws(demo.port) == 101
    for host in (f"127.0.0.1:{demo.port}", f"localhost:{demo.port}", f"[::1]:{demo.port}"):
        assert _ws(demo.port, host=host, origin=f"http://{host}") == 101, host
        for method, path in ROUTES:
            status, headers, _ = _http(demo.port, method, path, {"Host": host, "Origin": f"http://{host}"})
            # POST reaches the route, which has no POST: 405, not the checks' 403.
            assert status == (405 if method == "POST" else 200), (host, method, path)
            assert "access-control-allow-origin" not in headers  # same-origin needs no grant
    # Origins compare as browsers serialise them: case-insensitive, the default port implied.
    port = demo.port
    assert _http(port, "GET", "/healthz", {"Origin": "HTTP://LocalHost", "Host": "localhost:80"})[0] == 200
    assert _http(port, "GET", "/healthz", {"Origin": f"http://localhost:{port}", "Host": "localhost"})[0] == 403


def test_dns_rebinding_host_is_refused_on_every_route(demo: ServerProcess) -> None:
    """A hostile name resolving to 127.0.0.1 gets 403 on every route, even as its own "same" origin."""
    rebound = f"evil.example:{demo.port}"
    before = _refused(demo.port, "host")
    for method, path in [*ROUTES, ("GET", "/no-such-page")]:
        for origin in (None, f"http://{rebound}"):
            headers = {"Host": rebound, **({"Origin": origin} if origin else {})}
            status, response_headers, body = _http(demo.port, method, path, headers)
            assert status == 403, (method, path, origin)
            assert b"server.allowed_hosts" in body
            assert not any(h.startswith("access-control-") for h in response_headers)
    assert _ws(demo.port, host=rebound, origin=f"http://{rebound}") == 403
    assert _ws(demo.port, host=rebound) == 403
    assert _ws(demo.port, host="127.0.0.1.evil.example", origin="http://127.0.0.1.evil.example") == 403
    assert _refused(demo.port, "host") == before + 2 * (len(ROUTES) + 1) + 3


def test_loopback_host_forms_are_accepted(demo: ServerProcess) -> None:
    """``localhost``, ``127.0.0.1`` (any 127.x) and ``[::1]`` are accepted with or without port, in any case."""
    port = demo.port
    for host in (f"LocalHost:{port}", "localhost", "127.0.0.1", f"127.0.0.2:{port}", "[::1]", f"[::1]:{port}"):
        assert _http(port, "GET", "/healthz", {"Host": host})[0] == 200, host
    for host in ("::1", f"localhost.evil.example:{port}", f"127.0.0.1@evil.example:{port}", f"evil.example/{port}"):
        assert _http(port, "GET", "/healthz", {"Host": host})[0] == 403, host


def test_listed_origins_and_hosts_are_accepted(listed: InProcessServer) -> None:
    """Listed origins connect and get CORS grants (preflight too); listed host names are served."""
    port, dash = listed.port, "https://dash.example"
    assert _ws(port, origin=dash) == 101
    status, headers, _ = _http(port, "GET", "/healthz", {"Origin": dash})
    assert status == 200 and headers["access-control-allow-origin"] == dash
    status, headers, _ = _http(port, "OPTIONS", "/healthz", {"Origin": dash, **PREFLIGHT})
    assert status == 200 and headers["access-control-allow-origin"] == dash
    assert "POST" in headers["access-control-allow-methods"]

    lan = f"cam.lan:{port}"
    assert _http(port, "GET", "/healthz", {"Host": lan})[0] == 200
    assert _ws(port, host=lan, origin=f"http://{lan}") == 101  # a page the server served under that name
    assert _http(port, "GET", "/healthz", {"Host": f"localhost:{port}"})[0] == 200

    assert _ws(port, origin=EVIL) == 403
    status, headers, _ = _http(port, "OPTIONS", "/healthz", {"Origin": EVIL, **PREFLIGHT})
    assert status == 403 and "access-control-allow-origin" not in headers
    assert _http(port, "GET", "/healthz", {"Host": f"evil.example:{port}"})[0] == 403


def test_any_origin_only_when_listed_and_warned_without_tokens(tiny_model: Path, caplog) -> None:
    """``allowed_origins: ['*']`` lets every page in (CORS ``*``), still checks Host, and warns at start-up."""
    with caplog.at_level(logging.WARNING, logger="streamer.server.app"):
        server = InProcessServer({**DEMO, "server": {"allowed_origins": ["*"]}})
    assert any("allowed_origins is '*' with no access tokens" in r.getMessage() for r in caplog.records)
    server.start(min_frames=2)
    try:
        assert _ws(server.port, origin=EVIL) == 101
        status, headers, _ = _http(server.port, "GET", "/healthz", {"Origin": EVIL})
        assert status == 200 and headers["access-control-allow-origin"] == "*"
        assert _http(server.port, "GET", "/healthz", {"Host": f"evil.example:{server.port}"})[0] == 403
    finally:
        server.stop()


def test_startup_warnings_name_what_is_exposed() -> None:
    """Start-up warns of a non-loopback bind or ``*`` origins without tokens, and of nothing else."""
    assert startup_warnings(ServerConfig()) == []
    assert startup_warnings(ServerConfig(host="localhost", allowed_origins=["https://dash.example"])) == []
    (lan,) = startup_warnings(ServerConfig(host="0.0.0.0"))
    assert "0.0.0.0" in lan and "server.tokens" in lan and "DNS rebinding" in lan
    assert len(startup_warnings(ServerConfig(host="192.168.1.5", allowed_origins=["*"]))) == 2
    assert startup_warnings(ServerConfig(host="0.0.0.0", allowed_origins=["*"], tokens=["t"])) == []


def test_host_check_applies_on_loopback_binds_or_when_hosts_are_listed() -> None:
    """A LAN bind answers any Host unless ``allowed_hosts`` is set; a loopback bind checks always."""
    assert AccessPolicy.of(ServerConfig(host="0.0.0.0")).host_allowed("cam.lan:8765")
    listed = AccessPolicy.of(ServerConfig(host="0.0.0.0", allowed_hosts=["cam.lan"]))
    assert listed.host_allowed("CAM.lan:8765") and listed.host_allowed("127.0.0.1:8765")
    assert not listed.host_allowed("evil.example:8765")
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        assert not AccessPolicy.of(ServerConfig(host=host)).host_allowed("evil.example:8765"), host
    # Under TLS the handshake's scheme is wss and the dashboard's origin https.
    assert own_origin("wss", "127.0.0.1:8765") == "https://127.0.0.1:8765"
    assert own_origin("https", "localhost:443") == "https://localhost"


def test_origin_and_host_settings_are_validated_and_set_by_flags() -> None:
    """Malformed entries fail with the field named; flags add to the config; origins are normalised."""
    for server, field in (
        ({"allowed_origins": ["https://dash.example/"]}, "server.allowed_origins"),
        ({"allowed_origins": ["dash.example"]}, "server.allowed_origins"),
        ({"allowed_hosts": ["cam.lan:8765"]}, "server.allowed_hosts"),
        ({"allowed_hosts": ["http://cam.lan"]}, "server.allowed_hosts"),
    ):
        with pytest.raises(ConfigError, match=re.escape(field)):
            parse_settings({**DEMO, "server": server})
    args = build_parser().parse_args(
        ["demo", "--allowed-origin", "HTTPS://Dash.example:443", "--allowed-host", "Cam.LAN", "--allowed-host", "[::1]"]
    )
    server = settings_from_args(args, DEMO_CONFIG).server
    assert server.allowed_origins == ["https://dash.example"]
    assert server.allowed_hosts == ["cam.lan", "::1"]
