"""Checks a control request passes before its body is looked at: who may ask (Host, Origin, token)
and what they may send (JSON only, nesting bounded). Each check answers None or a `Refusal` that
names the problem and the fix; app.py turns a refusal into a 4xx JSON error.

Why each one exists, for a server that binds loopback by default:

- Host: a page on a name the attacker controls can re-resolve that name to 127.0.0.1 (DNS
  rebinding) and then talk to us "same-origin". Such a request still carries the attacker's name in
  `Host`, so only names we answer to pass: IP literals, `localhost`, and the operator's `allowed_hosts`.
- Origin: browsers send it on every cross-origin POST/PUT, `no-cors` fetches and form posts
  included; a foreign one is refused.
- Content type: a form or a `no-cors` fetch can only send form or text/plain bodies without a CORS
  preflight, so requiring application/json leaves a cross-site page nothing it can send.
- Token: compared in constant time on the raw header bytes, so any byte sequence is a plain 401.
"""
from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_JSON_DEPTH = 32  # a prompt or a playlist needs 3
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: an HTTP status and a message naming the problem and the fix."""

    status: int
    message: str


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if `body` nests arrays/objects deeper than `limit` (brackets inside strings do not count).

    Runs before json.loads, whose recursion would otherwise fail deep input with a RecursionError;
    it stops at the first bracket past the limit, so `[` x 65000 costs a few dozen steps."""
    depth = 0
    for match in _BRACKETS.finditer(_STRINGS.sub(b'""', body)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _host_name(host_header: str) -> str:
    """The name part of a Host header value ('[::1]:8000' -> '::1', 'Example.org.:80' -> 'example.org')."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_allowed(host_header: str | None, allowed_hosts: frozenset[str]) -> bool:
    """Whether a Host header names this server: an IP literal (a rebinding attack needs a DNS name),
    localhost, or one of `allowed_hosts` (lower case)."""
    if not host_header:
        return False  # HTTP/1.1 requires Host; a browser always sends it
    name = _host_name(host_header)
    return _is_ip_literal(name) or name == "localhost" or name.endswith(".localhost") or name in allowed_hosts


def check_host(host_header: str | None, allowed_hosts: frozenset[str]) -> Refusal | None:
    if host_allowed(host_header, allowed_hosts):
        return None
    return Refusal(403, f"Host {host_header!r} is not a name this server answers to (DNS rebinding guard); "
                        f"use its IP address or localhost, or start it with --allowed-host NAME")


def check_origin(origin: str | None, host_header: str | None, allowed_hosts: frozenset[str]) -> Refusal | None:
    """No Origin (curl, scripts, players) passes; a browser's Origin must be this server itself:
    the same host:port as the request's Host, or an allowed host name (a reverse proxy's public name)."""
    if origin is None:
        return None
    parts = urlsplit(origin) if origin != "null" else None
    if parts is not None and parts.scheme in ("http", "https") and parts.netloc:
        if host_header and parts.netloc.lower() == host_header.strip().lower():
            return None
        if (parts.hostname or "") in allowed_hosts:
            return None
    return Refusal(403, f"cross-origin request from {origin!r} refused: control the server from its own page "
                        f"or without a browser; behind a proxy add its public name with --allowed-host NAME")


def check_content_type(content_type: str) -> Refusal | None:
    if content_type == "application/json":
        return None
    return Refusal(415, f"Content-Type must be application/json, got {content_type or 'none'!r}; "
                        f"send the header 'Content-Type: application/json'")


def token_matches(raw_headers, token: str) -> bool:
    """Whether the raw `Authorization` header bytes are exactly b'Bearer <token>' (constant time).

    Raw bytes, not aiohttp's decoded str: a header with any bytes at all (non-ASCII, invalid UTF-8)
    must compare unequal, never fail to encode."""
    expected = b"Bearer " + token.encode("utf-8")
    given = next((value for name, value in raw_headers if name.lower() == b"authorization"), b"")
    return hmac.compare_digest(given, expected)
