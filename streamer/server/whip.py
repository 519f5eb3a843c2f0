"""WebRTC ingest by WHIP (RFC 9725): a browser, OBS or a call platform's bot publishes its
camera as a stream.

- ``POST /whip/{stream}`` with an SDP offer (``Content-Type: application/sdp``) answers
  ``201 Created`` with the SDP answer and the session's ``Location``
  (``/whip/{stream}/{session}``). ICE is not trickled: the answer carries the server's
  candidates (host candidates; STUN/TURN from ``server.publish.ice_servers``).
- ``DELETE`` on the ``Location`` hangs up; ``OPTIONS`` answers what is accepted.
- With tokens set, both need ``Authorization: Bearer <token>`` (401 otherwise).

The peer connection (aiortc) runs on the server's event loop. Its receiver decodes on its own
thread; the video track's frames are converted to RGB on the publishers' worker thread and
pushed into the stream (:mod:`streamer.server.publishing`). A call ends, and its stream is
removed, on ``DELETE``, when the peer's connection fails or closes, when its video track
ends, after ``idle_timeout_s`` without a frame, and at shutdown; every end closes the peer
connection, which stops its decoder thread and closes its sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from streamer.config import PublishConfig
from streamer.server.publishing import Publication, PublishError, Publishers

log = logging.getLogger(__name__)

SDP = "application/sdp"
MAX_OFFER_BYTES = 64 * 1024
ALLOW = "OPTIONS, POST"


class WhipSession:
    """One WHIP call: a peer connection feeding one publication."""

    def __init__(self, publishers: Publishers, pc: RTCPeerConnection, on_closed: Callable[[WhipSession], None]) -> None:
        self.id = secrets.token_urlsafe(16)
        self.publishers = publishers
        self.pc = pc
        self.publication: Publication | None = None
        self.tracks: list[MediaStreamTrack] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self._on_closed = on_closed
        self._closing = False

    def start(self, publication: Publication) -> None:
        """Feed the publication from the offer's tracks (audio is read and dropped)."""
        self.publication = publication
        for track in self.tracks:
            reader = self._read_video(track, publication) if track.kind == "video" else self._discard(track)
            task = asyncio.get_running_loop().create_task(reader, name=f"whip-{track.kind}-{publication.name}")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _read_video(self, track: MediaStreamTrack, publication: Publication) -> None:
        try:
            while True:
                frame = await track.recv()
                rgb = await self.publishers.to_rgb(frame)
                publication.push(rgb, float(frame.time) if frame.time is not None else None)
        except MediaStreamError:  # the track ended: the caller hung up
            self.hang_up("track ended")
        except RuntimeError:  # the publishers' worker is gone: shutting down
            pass

    @staticmethod
    async def _discard(track: MediaStreamTrack) -> None:
        """Audio is not used: read and drop it, so aiortc's queue does not grow."""
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    def hang_up(self, reason: str) -> None:
        """End the call (idempotent): the stream is removed at once, the peer closed after."""
        if self._closing:
            return
        self._closing = True
        if self.publication is not None:
            self.publishers.close(self.publication, reason)
        asyncio.get_running_loop().create_task(self._close_peer(), name=f"whip-close-{self.id}")

    async def _close_peer(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await self.pc.close()  # stops the receivers' decoder threads, closes the ICE sockets
        await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self.closed.set()
        self._on_closed(self)


class Whip:
    """The WHIP endpoint's routes and its open calls."""

    def __init__(self, publishers: Publishers, token_ok: Callable[[str | None], bool]) -> None:
        self.publishers = publishers
        self.token_ok = token_ok
        self.sessions: dict[str, WhipSession] = {}

    def routes(self) -> list[Route]:
        return [
            Route("/whip/{stream}", self.publish, methods=["POST", "OPTIONS"]),
            Route("/whip/{stream}/{session}", self.session, methods=["DELETE", "PATCH", "OPTIONS"]),
        ]

    async def publish(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": ALLOW, "Accept-Post": SDP})
        if not self.token_ok(request.headers.get("authorization")):
            return _refuse(401, "a valid token is needed: Authorization: Bearer <token>", bearer=True)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != SDP:
            return _refuse(415, f"the offer must be sent as Content-Type: {SDP}")
        body = await request.body()
        if len(body) > MAX_OFFER_BYTES:
            return _refuse(413, f"an SDP offer of at most {MAX_OFFER_BYTES} bytes")
        stream = request.path_params["stream"]
        try:
            self.publishers.check(stream)
            offer = body.decode()
        except PublishError as err:
            return _refuse(err.http_status, err.message)
        except UnicodeDecodeError:
            return _refuse(400, "the SDP offer is not UTF-8 text")
        if not offer.startswith("v=0") or "m=video" not in offer:
            return _refuse(400, "not an SDP offer with video: it must start with v=0 and have an m=video section")
        session = WhipSession(self.publishers, RTCPeerConnection(_rtc_configuration(self.publishers.cfg)), self._closed)
        try:
            await _take_offer(session, offer)
        except Exception as err:  # aiortc raises ValueError and others on an offer it cannot take
            log.info("stream %s: WHIP offer refused: %s", stream, err)
            session.hang_up("bad offer")
            return _refuse(400, f"the SDP offer was refused: {err or type(err).__name__}")
        try:
            publication = self.publishers.open(stream, "whip", session.hang_up)
        except PublishError as err:  # taken while the offer was read
            session.hang_up("refused")
            return _refuse(err.http_status, err.message)
        self.sessions[session.id] = session
        session.start(publication)
        try:
            await session.pc.setLocalDescription(await session.pc.createAnswer())  # gathers ICE: no trickle
        except Exception as err:
            log.warning("stream %s: WHIP answer failed: %s", stream, err)
            session.hang_up("answer failed")
            return _refuse(500, f"no answer could be made: {err or type(err).__name__}")
        location = f"/whip/{stream}/{session.id}"
        answer = session.pc.localDescription.sdp
        return Response(answer, status_code=201, media_type=SDP, headers={"Location": location, "ETag": session.id})

    async def session(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": "DELETE, OPTIONS"})
        if not self.token_ok(request.headers.get("authorization")):
            return _refuse(401, "a valid token is needed: Authorization: Bearer <token>", bearer=True)
        if request.method == "PATCH":  # trickle ICE and ICE restarts are optional (RFC 9725 section 4.3)
            return _refuse(405, "trickle ICE is not supported: the offer must carry its candidates", allow="DELETE")
        session = self.sessions.get(request.path_params["session"])
        if session is None or session.publication is None or session.publication.name != request.path_params["stream"]:
            return _refuse(404, "no such WHIP session")
        session.hang_up("DELETE")
        return Response(status_code=200)

    def _closed(self, session: WhipSession) -> None:
        self.sessions.pop(session.id, None)

    async def stop(self) -> None:
        """Hang up every call and wait for their peers to close."""
        sessions = list(self.sessions.values())
        for session in sessions:
            session.hang_up("shutdown")
        await asyncio.gather(*(s.closed.wait() for s in sessions))


async def _take_offer(session: WhipSession, offer: str) -> None:
    pc = session.pc

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        session.tracks.append(track)

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            session.hang_up(f"connection {pc.connectionState}")

    if "\na=fingerprint:" not in offer:  # aiortc would take it and fail later, inside its connect task
        raise ValueError("the offer has no DTLS fingerprint (a=fingerprint)")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
    if not any(t.kind == "video" for t in session.tracks):
        raise ValueError("the offer has no video track to receive")


def _rtc_configuration(cfg: PublishConfig) -> RTCConfiguration:
    servers = [
        RTCIceServer(
            urls=s.urls,
            username=s.username,
            credential=s.credential.get_secret_value() if s.credential else None,
        )
        for s in cfg.ice_servers
    ]
    return RTCConfiguration(iceServers=servers)


def _refuse(status: int, why: str, *, bearer: bool = False, allow: str | None = None) -> Response:
    headers = {}
    if bearer:
        headers["WWW-Authenticate"] = 'Bearer realm="streamer"'
    if allow:
        headers["Allow"] = allow
    return PlainTextResponse(why + "\n", status_code=status, headers=headers)
