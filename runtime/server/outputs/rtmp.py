"""RTMP push (`--publish rtmp://HOST/APP/KEY`, repeatable): a follower of the H.264 encode per target
(publish.py). No route: the server connects out, so the fleet ingress has nothing to route."""
from __future__ import annotations

from .base import FLEET_NONE, Encoding, Output
from ..publish import Publisher, prometheus_text


def make_encoders(encoding: Encoding) -> list:
    server = encoding.server
    server.publishers = [Publisher(url, encoding.h264, encoding.fps) for url in server.config.publish]
    return list(server.publishers)


def status(server) -> dict:
    return {"publish": [publisher.state() for publisher in server.publishers]}


def prometheus(server) -> str:
    return prometheus_text(server.publishers)


OUTPUT = Output(name="rtmp", title="RTMP push", paths=(), content_type="video/x-flv", fleet=FLEET_NONE,
                selectable=False, h264=True, enabled=lambda config: bool(config.publish),
                make_encoders=make_encoders, status=status, prometheus=prometheus)
