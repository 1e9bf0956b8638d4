"""WebRTC viewer load for `benchmarks/egress.py`: many WHEP sessions (aiortc clients) in one process.

Each viewer POSTs a recvonly offer to /whep, receives (and, aiortc being a full client, decodes) the
video for `--seconds`, then DELETEs its session. Run at lower CPU priority: the viewers stand in for
players on other machines.

    python benchmarks/whep_viewers.py --base http://127.0.0.1:8000 --count 20 --seconds 20

Prints one JSON line: sessions that connected, frames received in all, errors, this process's CPU seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
import urllib.parse


async def viewer(base: str, seconds: float, tally: dict) -> None:
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    track_ready = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: track_ready.done() or track_ready.set_result(track))
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/whep", data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as r:
                if r.status != 201:
                    tally["errors"][f"HTTP {r.status}"] = tally["errors"].get(f"HTTP {r.status}", 0) + 1
                    return
                answer, resource_url = await r.text(), urllib.parse.urljoin(base + "/whep", r.headers["Location"])
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            track = await asyncio.wait_for(track_ready, 20)
            deadline = time.monotonic() + seconds
            first = True
            while time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(track.recv(), max(0.1, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                if first:
                    tally["connected"] += 1
                    first = False
                tally["frames"] += 1
            async with http.delete(resource_url) as r:
                tally["deleted"] += r.status == 200
    except Exception as err:  # a viewer's failure is counted, the others go on
        tally["errors"][type(err).__name__] = tally["errors"].get(type(err).__name__, 0) + 1
    finally:
        await pc.close()


async def run(base: str, count: int, seconds: float) -> dict:
    tally = {"connected": 0, "frames": 0, "deleted": 0, "errors": {}}
    await asyncio.gather(*(viewer(base, seconds, tally) for _ in range(count)))
    return tally


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--nice", type=int, default=10)
    args = p.parse_args()
    os.nice(args.nice)
    report = asyncio.run(run(args.base, args.count, args.seconds))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
