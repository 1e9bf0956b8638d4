"""An aiortc WHEP client for tests: offer to receive video, POST the offer to `<base>/whep`, decode
frames, DELETE the session's resource (the Location the answer gives, resolved against the POST's
URL, so it works under a prefix such as the fleet ingress's /streams/<id>/)."""
from __future__ import annotations

import asyncio
import urllib.parse

import numpy as np


async def whep_session(base: str, frames_wanted: int, codecs=("video/H264",), timeout: float = 40.0):
    """Offer to receive video (only `codecs`), POST it to /whep, decode `frames_wanted` frames;
    DELETE the session. Returns (POST status, answer headers, (decoded WebRTC frames, MJPEG frames of
    the same seconds) as RGB arrays, DELETE status, second DELETE status); on a refused offer the
    third item is the answer's body and the last two are None."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    transceiver = pc.addTransceiver("video", direction="recvonly")
    transceiver.setCodecPreferences([c for c in RTCRtpReceiver.getCapabilities("video").codecs
                                     if c.mimeType in codecs or c.mimeType == "video/rtx"])
    got_track = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: got_track.set_result(track))
    await pc.setLocalDescription(await pc.createOffer())
    frames, jpegs = [], []
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/whep", data=pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp"}) as r:
            status, headers, body = r.status, dict(r.headers), await r.text()
        if status != 201:
            await pc.close()
            return status, headers, body, None, None
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        try:
            track = await asyncio.wait_for(got_track, timeout)
            async def receive():
                while len(frames) < frames_wanted:
                    frames.append((await track.recv()).to_ndarray(format="rgb24"))
            await asyncio.wait_for(asyncio.gather(receive(), read_mjpeg(http, base, jpegs, frames, frames_wanted)),
                                   timeout)
        finally:
            resource = urllib.parse.urljoin(base + "/whep", headers["Location"])
            async with http.delete(resource) as r:
                deleted = r.status
            async with http.delete(resource) as r:
                deleted_again = r.status
            await pc.close()
    return status, headers, (frames, jpegs), deleted, deleted_again


async def read_mjpeg(http, base: str, jpegs: list, frames: list, frames_wanted: int) -> None:
    """The same stream's MJPEG frames, decoded, while the WebRTC frames arrive (an independent path:
    Pillow's JPEG against libx264 + aiortc's H.264 decoder); nothing if the server has no MJPEG."""
    import io

    from PIL import Image

    async with http.get(base + "/stream.mjpg") as r:
        if r.status != 200:
            return
        buffer = b""
        while len(frames) < frames_wanted:
            buffer += await r.content.readany()
            while True:
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
                if not sep or not length or len(rest) < length[0] + 2:
                    break
                jpegs.append(np.asarray(Image.open(io.BytesIO(rest[:length[0]])).convert("RGB")))
                buffer = rest[length[0] + 2:]
