"""WebRTC out, negotiated by WHEP (draft-ietf-wish-whep), on aiortc.

    POST   /whep        an SDP offer (Content-Type: application/sdp, all ICE candidates in it)
                        -> 201 Created, the SDP answer, Location: whep/<session> (the session's resource)
    DELETE /whep/<id>   ends the session (200; 404 for a session that is not there)
    PATCH  /whep/<id>   405: no trickle ICE; the offer carries its candidates (non-trickle WHEP)

Video only, H.264, from the one encode the other H.264 outputs share: this output follows that
encode's packets (no second libx264), or leads it when no other H.264 output is on. Each viewer's
peer connection packetizes the same Annex B packets (aiortc packs an `av.Packet` as it is, no
re-encode). Why H.264 and no VP8: a VP8 encode would be a second encode per frame, and every
browser WebRTC stack must decode H.264 (RFC 7742 makes both H.264 and VP8 mandatory to implement),
so an offer without H.264 is refused (406, named) rather than served by a second encoder.
A viewer joins at the next keyframe (at most 1 s: one GOP a second) and a viewer that cannot keep
up skips to the next keyframe (Broadcast); keyframe requests (PLI/FIR) are not honoured, since the
encode is shared, so a lost packet is repaired by NACK retransmission or by the next keyframe.

Viewing is public, like /stream.mjpg and HLS: no token. A session holds UDP sockets and a DTLS
context, so sessions are capped, in all (`ServerConfig.max_webrtc_sessions`, 503 past it) and per
client address (`max_webrtc_sessions_per_address`, 429 past it: one client cannot take them all), an offer is bounded
like every body (`max_body_bytes`), and a session that has not connected within CONNECT_TIMEOUT_S or
whose connection fails is closed. Media flows over UDP straight between the viewer and this process
(ICE host candidates of this machine's interfaces; no STUN/TURN server is asked), so behind the
fleet ingress only the signalling is forwarded.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque

from .base import FLEET_FORWARD, Encoding, Output, Serving
from ..encoders import _H264Output

log = logging.getLogger("skyrt.server")

NAME = "webrtc"
SDP = "application/sdp"
CONNECT_TIMEOUT_S = 20.0  # a session whose ICE/DTLS has not connected by then is closed
SESSION_ID_BYTES = 16  # the resource URL is the only handle on a session: unguessable
H264_CLOCK = 90_000


def _has_parameter_sets(annexb: bytes) -> bool:
    """Whether an Annex B access unit carries an SPS (NAL type 7) of its own."""
    i = annexb.find(b"\x00\x00\x01")
    while i != -1 and i + 3 < len(annexb):
        if annexb[i + 3] & 0x1F == 7:
            return True
        i = annexb.find(b"\x00\x00\x01", i + 3)
    return False


class WebRtcFeed(_H264Output):
    """The H.264 packets of the shared encode, as (Annex B access unit, pts, time_base) items in the
    "webrtc" Broadcast (keyframes marked). On a keyframe without in-band SPS/PPS (an MP4 or HLS
    leader keeps them in its extradata) the parameter sets are put in front, as a WebRTC receiver
    needs them before every IDR it may join at."""

    name = NAME

    def __init__(self, broadcast, fps: int, width: int, height: int, leader: _H264Output | None = None):
        import io

        import av

        self.broadcast = broadcast
        # As a leader: a raw H.264 "container" that is never written (packets are taken in _mux).
        container = None if leader is not None else av.open(io.BytesIO(), mode="w", format="h264")
        super().__init__(container, fps, width, height, leader)

    def _publish(self, data: bytes, pts, time_base, keyframe: bool, extradata: bytes | None) -> None:
        if keyframe and extradata and not _has_parameter_sets(data):
            data = bytes(extradata) + data
        self.broadcast.publish((data, pts, time_base), keyframe=keyframe)

    def _mux(self, packet) -> None:  # leading: the packet straight from libx264
        self._publish(bytes(packet), packet.pts, packet.time_base, bool(packet.is_keyframe),
                      self._stream.codec_context.extradata)

    def _mux_copy(self, copy: tuple, template) -> None:  # following: a copy of the leader's packet
        try:
            data, pts, _dts, time_base, keyframe = copy
            self._publish(data, pts, time_base, bool(keyframe), template.codec_context.extradata)
        except Exception as err:  # one broken output must not take the leader down
            self._follower_error = err

    def close(self) -> None:
        pass  # nothing was written to the container


def make_encoders(encoding: Encoding) -> list:
    feed = WebRtcFeed(encoding.server.broadcasts[NAME], encoding.fps, encoding.width, encoding.height,
                      leader=encoding.h264)
    encoding.h264 = encoding.h264 or feed
    return [feed]


def _track_class():
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class BroadcastTrack(MediaStreamTrack):
        """One viewer's video track: the packets of the "webrtc" Broadcast from the next keyframe on."""

        kind = "video"

        def __init__(self, reader):
            super().__init__()
            self.reader = reader
            self._pending: deque = deque()

        async def recv(self):
            import av

            while not self._pending:
                if self.reader.broadcast.closed or self.readyState != "live":
                    raise MediaStreamError
                await self.reader.wait(0.25)
                self._pending.extend(self.reader.take())
            data, pts, time_base = self._pending.popleft()
            packet = av.Packet(data)
            packet.pts, packet.time_base = pts, time_base
            return packet

    return BroadcastTrack


class WhepSessions:
    """The WHEP sessions of a server: id -> peer connection, capped in all and per client address,
    each closed once."""

    def __init__(self, server, limit: int, per_address: int):
        self.server, self.limit, self.per_address = server, limit, per_address
        self.sessions: dict[str, tuple] = {}  # id -> (RTCPeerConnection, its Broadcast Reader)
        self.addresses: dict[str, str] = {}  # id -> the client address that opened it
        self.created = self.refused_full = self.refused_per_address = self.closed_unconnected = 0

    def held_by(self, address: str) -> int:
        """Sessions open now that `address` opened."""
        return sum(1 for held in self.addresses.values() if held == address)

    async def open(self, offer_sdp: str, address: str) -> tuple[str, str]:
        """Answer `offer_sdp` from client `address`: (session id, answer SDP). ValueError names what is
        wrong with the offer."""
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription

        broadcast = self.server.broadcasts[NAME]
        reader = broadcast.subscribe_at_next_keyframe()
        track = _track_class()(reader)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only: no STUN lookups
        session = secrets.token_urlsafe(SESSION_ID_BYTES)
        try:
            transceiver = pc.addTransceiver(track, direction="sendonly")
            transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                             if c.mimeType.lower() in ("video/h264", "video/rtx")])
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())  # gathers every candidate (non-trickle)
        except Exception as err:
            await pc.close()
            raise ValueError(f"the SDP offer could not be answered ({type(err).__name__}: {err})") from err
        self.sessions[session] = (pc, reader)
        self.addresses[session] = address
        self.created += 1
        self.server.metrics.client_connected(NAME, reader)

        @pc.on("connectionstatechange")
        async def changed():
            if pc.connectionState in ("failed", "closed"):
                await self.close(session)

        asyncio.get_running_loop().call_later(CONNECT_TIMEOUT_S, self._expire_unconnected, session)
        return session, pc.localDescription.sdp

    def _expire_unconnected(self, session: str) -> None:
        pc, _reader = self.sessions.get(session, (None, None))
        if pc is not None and pc.connectionState != "connected":
            self.closed_unconnected += 1
            asyncio.ensure_future(self.close(session))

    async def close(self, session: str) -> bool:
        """End a session; False if it is not there (already closed, or never was)."""
        pc, reader = self.sessions.pop(session, (None, None))
        if pc is None:
            return False
        self.addresses.pop(session, None)
        self.server.metrics.client_disconnected(NAME, reader)
        await pc.close()
        return True

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(s) for s in list(self.sessions)), return_exceptions=True)

    def state(self) -> dict:
        return {"sessions": len(self.sessions), "limit": self.limit, "per_address_limit": self.per_address,
                "created": self.created, "refused_full": self.refused_full,
                "refused_per_address": self.refused_per_address, "closed_unconnected": self.closed_unconnected}


def _offers_h264(sdp: str) -> bool:
    return any(line.lower().startswith("a=rtpmap:") and " h264/90000" in line.lower() for line in sdp.splitlines())


def add_routes(app, serving: Serving) -> None:
    from aiohttp import web

    server = serving.server
    sessions = server.whep = WhepSessions(server, server.config.max_webrtc_sessions,
                                          server.config.max_webrtc_sessions_per_address)
    serving.shutdown_hooks.append(sessions.close_all)

    async def offer(request):
        if request.content_type != SDP:
            return serving.error(415, f"a WHEP offer is an SDP body with 'Content-Type: {SDP}', "
                                      f"got {request.content_type or 'none'}")
        try:
            import aiortc  # noqa: F401  (optional: in the serve extra)
        except ImportError:
            return serving.error(501, "WebRTC needs aiortc on the server: pip install 'skyrt[serve]'")
        try:
            body = await serving.read_body(request)
        except web.HTTPRequestEntityTooLarge:
            return serving.error(413, f"SDP offer larger than {server.config.max_body_bytes} bytes")
        try:
            sdp = body.decode("utf-8")
        except UnicodeDecodeError:
            return serving.error(400, "the SDP offer is not UTF-8 text")
        if "m=video" not in sdp:
            return serving.error(400, "the SDP offer has no video section (m=video); offer to receive video")
        if not _offers_h264(sdp):
            return serving.error(406, "this server sends H.264 only (the shared encode) and the offer lists no "
                                      "H.264 codec; use a client that can receive H.264 (every browser can)")
        if len(sessions.sessions) >= sessions.limit:
            sessions.refused_full += 1
            response = serving.error(503, f"all {sessions.limit} WebRTC sessions are in use; retry later "
                                          "or watch HLS (hls/live.m3u8)")
            response.headers["Retry-After"] = "5"
            return response
        address = request.remote or "?"
        if sessions.held_by(address) >= sessions.per_address:
            sessions.refused_per_address += 1
            response = serving.error(429, f"this address ({address}) already holds {sessions.per_address} WebRTC "
                                          f"sessions, the most one address may (--max-webrtc-sessions-per-address); "
                                          f"end one (DELETE its resource URL) or retry later")
            response.headers["Retry-After"] = "5"
            return response
        try:
            session, answer = await sessions.open(sdp, address)
        except ValueError as err:
            return serving.error(400, str(err))
        # Relative to the request: /whep -> /whep/<id>, /streams/<s>/whep -> /streams/<s>/whep/<id>.
        return web.Response(status=201, text=answer, content_type=SDP,
                            headers={"Location": f"whep/{session}", "Cache-Control": "no-store"})

    async def end(request):
        if await sessions.close(request.match_info["session"]):
            return web.Response(status=200)
        return serving.error(404, "no such WebRTC session (it ended, or never was)")

    async def no_trickle(_request):
        return serving.error(405, "trickle ICE is not supported: send the offer with all its ICE candidates "
                                  "(wait for ICE gathering to complete before the POST)")

    app.router.add_post("/whep", offer)
    app.router.add_delete("/whep/{session}", end)
    app.router.add_patch("/whep/{session}", no_trickle)


def status(server) -> dict:
    sessions = getattr(server, "whep", None)
    return {"webrtc": None if sessions is None else sessions.state()}


def prometheus(server) -> str:
    sessions = getattr(server, "whep", None)
    if sessions is None:
        return ""
    state = sessions.state()
    return ("# HELP skyrt_webrtc_sessions WHEP sessions open now.\n# TYPE skyrt_webrtc_sessions gauge\n"
            f"skyrt_webrtc_sessions {state['sessions']}\n"
            "# HELP skyrt_webrtc_sessions_refused_total WHEP offers refused because every session was in use.\n"
            "# TYPE skyrt_webrtc_sessions_refused_total counter\n"
            f"skyrt_webrtc_sessions_refused_total {state['refused_full']}\n"
            "# HELP skyrt_webrtc_sessions_refused_per_address_total WHEP offers refused because their address "
            "held its most sessions.\n# TYPE skyrt_webrtc_sessions_refused_per_address_total counter\n"
            f"skyrt_webrtc_sessions_refused_per_address_total {state['refused_per_address']}\n")


OUTPUT = Output(name=NAME, title="WebRTC (WHEP)", paths=("whep",), content_type=SDP, fleet=FLEET_FORWARD,
                fleet_paths=r"/whep(?:/[A-Za-z0-9_-]{1,64})?", h264=True, broadcast="keyframes",
                make_encoders=make_encoders, add_routes=add_routes, status=status, prometheus=prometheus)
