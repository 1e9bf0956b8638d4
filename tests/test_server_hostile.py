"""`skyrt serve` on an open network: a real server process on loopback, fed what a hostile network and
careless clients send. Deep JSON, any header bytes, clients that reset or half-close, readers that
stall, a SIGTERM with stalled readers, connection floods, cross-site control, kill -9.

Every request loop here is bounded in count and in time."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from serving import FAST_SAMPLING, TOKEN, free_port, get_json, process_gone, read_for, running_server, wait_until

from skyrt.runtime.server.encoders import MJPEG_KEEPALIVE_S

# 128x128 frames of the tiny random model: noise compresses badly, so a reader that stops reading
# fills its socket buffers within a second or two.
BIG_FRAMES = ["--height", "128", "--width", "128", "--steps", "2", "--fps", "24"]


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _raw(base: str, data: bytes, timeout: float = 10.0, source: str | None = None) -> bytes:
    """Send raw bytes, read the whole answer (the server closes after an error or we time out)."""
    sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    with sock:
        sock.sendall(data)
        reply = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            reply += chunk
            if b"\r\n\r\n" in reply and _body_complete(bytes(reply)):
                break
    return bytes(reply)


def _body_complete(reply: bytes) -> bool:
    head, _, body = reply.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: *(\d+)", head, flags=re.I)
    return match is not None and len(body) >= int(match.group(1))


def _status_and_json(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] \d{3} ", head), reply[:300]
    assert b"application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


def _post(base: str, path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST",
          host: str | None = None) -> bytes:
    headers = {"Host": host or f"127.0.0.1:{_port(base)}", "Content-Type": "application/json",
               "Authorization": f"Bearer {TOKEN}", "Content-Length": str(len(body)), "Connection": "close",
               **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items() if v is not None)
    return _raw(base, head.encode() + b"\r\n" + body)


def _no_tracebacks(proc) -> None:
    output = proc.output()
    assert "Traceback" not in output and "ERROR" not in output, output[-4000:]


@pytest.fixture(scope="module")
def server(official_dir):
    with running_server(official_dir, "--stall-timeout", "2") as (base, proc):
        yield base, proc


# ---------------------------------------------------------------- 1. deep JSON
@pytest.mark.parametrize("path, method", [("/prompt", "POST"), ("/playlist", "PUT")])
@pytest.mark.parametrize("body", [b"[" * 65000, b'{"a":' * 12000, b'{"items": ' + b"[" * 40 + b"]" * 40 + b"}"],
                         ids=["65000 brackets", "12000 objects", "40 levels, well formed"])
def test_deeply_nested_json_is_a_400_that_names_the_depth(server, path, method, body):
    base, proc = server
    started = time.monotonic()
    code, reply = _status_and_json(_post(base, path, body, method=method))
    assert code == 400 and "deeper than 32 levels" in reply["error"], reply
    assert time.monotonic() - started < 5  # cheap: no parse of 64 KB of brackets
    assert get_json(base + "/healthz")["ok"]


def test_json_with_brackets_inside_strings_is_not_mistaken_for_nesting(server):
    base, _ = server
    code, reply = _status_and_json(_post(base, "/prompt", json.dumps({"prompt": "[[[{{{" * 100}).encode()))
    assert code == 200 and reply["prompt"].startswith("[[[{{{"), reply


# ---------------------------------------------------------------- 2. any header bytes
@pytest.mark.parametrize("value", [b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer \xff\xfe\x80", "Bearer s3cr\u00e9t".encode(),
                                   b"\xe2\x98\x83", b"Bearer " + TOKEN.encode() + b"\xc2\xa0"])
def test_non_ascii_authorization_header_is_a_401(server, value):
    base, _ = server
    body = b'{"prompt": "a blue square"}'
    head = (f"POST /prompt HTTP/1.1\r\nHost: 127.0.0.1:{_port(base)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
    code, reply = _status_and_json(_raw(base, head + b"Authorization: " + value + b"\r\n\r\n" + body))
    assert code == 401 and "unauthorized" in reply["error"], reply


def test_malformed_http_gets_a_json_400_and_no_log_flood(server):
    base, proc = server
    size_before = len(proc.output())
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                    b"GET /\x00 HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 50):
        reply = _raw(base, garbage)  # aiohttp's own answer (text, not JSON: aiohttp writes it itself)
        assert re.match(rb"HTTP/1\.[01] 400 ", reply), (garbage, reply[:300])
    for _ in range(200):  # a scanner's worth of junk: the log must not grow per request
        _raw(base, b"NOT HTTP AT ALL\r\n\r\n", timeout=5)
    assert len(proc.output()) - size_before < 5_000
    assert get_json(base + "/healthz")["ok"]


# ---------------------------------------------------------------- 3. clients that reset or half-close
def _reset_after(base: str, request: bytes) -> None:
    sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
    sock.sendall(request)
    sock.close()


def test_clients_that_reset_right_after_their_request_are_counted_not_logged(server):
    base, proc = server
    gone_before = get_json(base + "/status")["clients_gone"]
    host = f"Host: 127.0.0.1:{_port(base)}\r\n"
    body = b'{"prompt": "a red circle"}'
    requests = [f"GET {path} HTTP/1.1\r\n{host}\r\n".encode() for path in ("/stream.mjpg", "/stream.mp4",
                                                                          "/hls/live.m3u8", "/status")]
    requests.append((f"POST /prompt HTTP/1.1\r\n{host}Content-Type: application/json\r\nAuthorization: Bearer "
                     f"{TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    for i in range(20):
        _reset_after(base, requests[i % len(requests)])
    time.sleep(1.0)
    status = get_json(base + "/status")
    assert status["clients_gone"] > gone_before  # counted (some resets land before a handler runs)
    assert sum(status["clients"].values()) == 0
    _no_tracebacks(proc)


def test_a_client_that_half_closes_still_receives_the_stream(server):
    base, _ = server
    sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=10)
    with sock:
        sock.sendall(f"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1:{_port(base)}\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)  # some players do: "my request is done"
        data = bytearray()
        deadline = time.monotonic() + 10
        while data.count(b"--skyrtframe") < 10 and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"--skyrtframe") >= 10, data[:300]


# ---------------------------------------------------------------- 4. stalled readers
def _stalled_reader(base: str, path: str = "/stream.mjpg") -> socket.socket:
    """A client that asks for a stream and never reads; a small receive buffer makes it stall fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", _port(base)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{_port(base)}\r\n\r\n".encode())
    return sock


def _reset_seen(sock: socket.socket) -> bool:
    """Whether the server closed the connection: a reset (or, once the buffered bytes are read, EOF)."""
    sock.settimeout(2.0)
    try:
        for _ in range(10_000):  # bounded: the receive buffer is small
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return False


def _server_send_queue(server_port: int, client_port: int) -> int | None:
    """Bytes the kernel holds unsent on the server's side of one loopback connection (/proc/net/tcp
    tx_queue), None once that connection is gone."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[0], 16)
    return None


def _wait_until_writes_stall(server_port: int, sock: socket.socket, timeout: float = 60.0,
                             quiet_s: float = 2 * MJPEG_KEEPALIVE_S) -> float:
    """When the server's writes to a non-reading client stopped going anywhere: its kernel send queue
    stopped growing for `quiet_s` (MJPEG sends a part at least every MJPEG_KEEPALIVE_S, so a queue
    that does not grow for twice that is full), or the server cut the connection first. Returns the
    monotonic time the queue last grew."""
    client_port = sock.getsockname()[1]
    last, last_change = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = _server_send_queue(server_port, client_port)
        if queued is None:  # already cut off (it can happen before `quiet_s` has passed)
            assert last > 0, "the connection closed before anything was queued"
            return last_change
        if queued != last:
            last, last_change = queued, time.monotonic()
        elif queued > 0 and time.monotonic() - last_change >= quiet_s:
            return last_change
        time.sleep(0.05)
    raise AssertionError(f"the server's send queue never filled ({last} bytes after {timeout} s)")


def test_a_stalled_reader_is_cut_off_and_its_socket_closed_within_the_timeout(official_dir):
    stall_s = 2.0
    # A small send buffer fills within seconds however slowly this busy machine generates.
    with running_server(official_dir, "--stall-timeout", str(stall_s), "--send-buffer-kib", "16",
                        sampling=BIG_FRAMES) as (base, proc):
        fds_before = get_json(base + "/status")["open_fds"]
        sock = _stalled_reader(base)
        connected = time.monotonic()
        full = _wait_until_writes_stall(_port(base), sock)
        wait_until(lambda: get_json(base + "/status")["client_write_timeouts"] >= 1, 30,
                   lambda: f"never detected the stall: {get_json(base + '/status')}")
        detected = time.monotonic()
        # The socket goes with the client: fds back to where they were at once, not when the peer reads.
        wait_until(lambda: get_json(base + "/status")["open_fds"] <= fds_before, 1.0,
                   lambda: f"fds {get_json(base + '/status')['open_fds']} > {fds_before} after the cut")
        assert time.monotonic() - detected <= 1.0
        # The server finds the socket full at its next write, which comes within MJPEG_KEEPALIVE_S
        # of the last bytes that went in; from then on it cuts the client off within the stall
        # timeout plus a second. (The stream socket's fixed send buffer fills within seconds of
        # connecting, not after megabytes.)
        assert detected - full <= MJPEG_KEEPALIVE_S + stall_s + 1.0, (detected - full, full - connected)
        assert full - connected <= 60.0, full - connected
        assert _reset_seen(sock)
        sock.close()
        status = get_json(base + "/status")
        assert sum(status["clients"].values()) == 0
        assert proc.poll() is None


def test_sigterm_with_stalled_readers_exits_cleanly_within_two_seconds(official_dir):
    with running_server(official_dir, sampling=BIG_FRAMES) as (base, proc):  # default 20 s stall timeout
        sockets = [_stalled_reader(base, ("/stream.mjpg", "/stream.mp4")[i % 2]) for i in range(6)]
        wait_until(lambda: sum(get_json(base + "/status")["clients"].values()) == 6, 10)
        time.sleep(3.0)  # their socket buffers are full: every write to them now blocks
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        took = time.monotonic() - started
        for sock in sockets:
            sock.close()
        assert code == 0 and took < 2.0, (code, took, proc.output()[-3000:])
        assert "stream stopped after" in proc.output()


def test_sigterm_while_the_model_loads_is_a_clean_exit(official_dir):
    cmd = [sys.executable, "-m", "skyrt.runtime.cli", "serve", "--model", str(official_dir), "--port",
           str(free_port()), "--no-token", *FAST_SAMPLING]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # until SIGTERM is caught by skyrt
            caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", Path(f"/proc/{proc.pid}/status").read_text(), re.M)
            if caught and int(caught.group(1), 16) & (1 << (signal.SIGTERM - 1)):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, out
    assert "stopped (SIGTERM) before the stream started" in out and "Traceback" not in out, out


def _per_client(base: str, metric: str) -> dict[str, tuple[str, int]]:
    """A per-client gauge of /metrics: client id -> (format, value)."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.findall(rf'^{metric}{{client="(\d+)",format="(\w+)"}} (\d+)$', text, re.M)
    return {rid: (fmt, int(value)) for rid, fmt, value in found}


def test_stream_clients_that_never_read_hold_a_bounded_queue_and_the_generator_goes_on(official_dir):
    """An MJPEG and an fMP4 client that never read: once their sockets are full the server queues no
    more bytes for them (what it holds unsent, in its transport and in the kernel, stops growing), the
    ring drops what they miss, and frames keep being generated and reaching a viewer that reads."""
    # A long stall timeout: the clients stay connected through the whole check (the cut-off itself is
    # the stalled-reader test above).
    with running_server(official_dir, "--stall-timeout", "120", "--send-buffer-kib", "16",
                        "--formats", "mjpeg,mp4", sampling=BIG_FRAMES) as (base, proc):
        port = _port(base)
        socks = {fmt: _stalled_reader(base, path) for fmt, path in (("mjpeg", "/stream.mjpg"), ("mp4", "/stream.mp4"))}
        try:
            # Full: the server holds bytes in user space (the kernel took no more of its last write).
            wait_until(lambda: len(q := _per_client(base, "skyrt_client_queued_bytes")) == 2
                       and all(n > 0 for _fmt, n in q.values()), 60,
                       lambda: f"the stalled clients' sockets never filled: {_per_client(base, 'skyrt_client_queued_bytes')}")
            stalled = {rid: fmt for rid, (fmt, _n) in _per_client(base, "skyrt_client_queued_bytes").items()}
            assert sorted(stalled.values()) == ["mjpeg", "mp4"], stalled

            def held() -> dict[str, int]:
                """Bytes held unsent per stalled client: the server's transport buffer + its kernel send queue."""
                queued = _per_client(base, "skyrt_client_queued_bytes")
                kernel = {fmt: _server_send_queue(port, sock.getsockname()[1]) for fmt, sock in socks.items()}
                assert all(k is not None for k in kernel.values()), f"a stalled client was cut off: {kernel}"
                return {fmt: queued[rid][1] + kernel[fmt] for rid, fmt in stalled.items()}

            def missed() -> dict[str, int]:
                drops = _per_client(base, "skyrt_client_queue_drops")
                return {fmt: drops[rid][1] for rid, fmt in stalled.items()}

            full = held()
            before = get_json(base + "/status")
            # Until the ring has dropped items for both (they missed frames rather than queueing them),
            # then 2 s more: what is held for them never grows.
            most = dict(full)
            deadline = time.monotonic() + 60
            while not all(m > 0 for m in missed().values()):
                assert time.monotonic() < deadline, f"no drops: {missed()}"
                most = {fmt: max(most[fmt], n) for fmt, n in held().items()}
                time.sleep(0.2)
            viewer = read_for(base + "/stream.mjpg", 2.0)  # a reading viewer is served meanwhile
            most = {fmt: max(most[fmt], n) for fmt, n in held().items()}
            after = get_json(base + "/status")
            lost = missed()
        finally:
            for sock in socks.values():
                sock.close()
        # Bounded: at most one write past the socket's fill, and not a byte more after (one 128x128
        # noise frame is tens of kB; a server that queued every frame would hold MBs by now).
        assert most == full, (full, most)
        assert all(n < 512 * 1024 for n in full.values()), full
        assert all(m > 0 for m in lost.values()), lost
        generated = after["frames_generated"] - before["frames_generated"]
        assert generated >= 12, (generated, before, after)  # the generator went on (about a second's worth)
        assert viewer.count(b"--skyrtframe") >= 2, len(viewer)
        assert proc.poll() is None


# ---------------------------------------------------------------- 6. connection caps
def _streaming(base: str, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=10, source_address=(source, 0))
    sock.sendall(f"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1:{_port(base)}\r\n\r\n".encode())
    assert sock.recv(12).startswith(b"HTTP/1.1 200")
    return sock


def test_connection_caps_answer_503_json_and_idle_keepalives_go_first(official_dir):
    limits = ["--max-connections", "12", "--max-connections-per-address", "8"]
    with running_server(official_dir, *limits) as (base, proc):
        open_sockets = []
        try:
            # Idle connections (sent nothing) at the per-address cap are shed for a real request.
            open_sockets += [socket.create_connection(("127.0.0.1", _port(base)), timeout=10) for _ in range(8)]
            time.sleep(0.3)
            assert get_json(base + "/healthz")["ok"]
            assert get_json(base + "/status")["connections"]["idle_shed"] >= 1
            for sock in open_sockets:
                sock.close()
            open_sockets.clear()
            wait_until(lambda: get_json(base + "/status")["connections"]["open"] <= 1, 5)

            # Busy connections are never shed: past the cap, a clear 503.
            open_sockets += [_streaming(base) for _ in range(8)]
            code, reply = _status_and_json(_raw(base, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
            assert code == 503 and "too many connections from 127.0.0.1" in reply["error"], reply
            open_sockets += [_streaming(base, "127.0.0.2") for _ in range(4)]  # 12 in all
            code, reply = _status_and_json(_raw(base, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                                                source="127.0.0.3"))
            assert code == 503 and "connection limit (12)" in reply["error"], reply
        finally:
            for sock in open_sockets:
                sock.close()
        wait_until(lambda: get_json(base + "/status")["connections"]["open"] <= 1, 5)
        status = get_json(base + "/status")
        assert status["connections"]["refused"] >= 2 and proc.poll() is None
        _no_tracebacks(proc)


# ---------------------------------------------------------------- 5. cross-site control, by hand
@pytest.fixture(scope="module")
def open_server(official_dir):
    """The worst case: control open (--no-token); only Origin, Host and content type stand guard."""
    with running_server(official_dir, token=None) as (base, proc):
        yield base, proc


@pytest.mark.parametrize("headers, host, status, words", [
    ({"Content-Type": "text/plain"}, None, 415, "Content-Type must be application/json"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, None, 415, "application/json"),
    ({"Content-Type": "multipart/form-data; boundary=x"}, None, 415, "application/json"),
    ({"Content-Type": None}, None, 415, "application/json"),
    ({"Origin": "http://127.0.0.1:1"}, None, 403, "cross-origin request from 'http://127.0.0.1:1'"),
    ({"Origin": "http://evil.example"}, None, 403, "cross-origin"),
    ({"Origin": "null"}, None, 403, "cross-origin"),
    ({}, "evil.example", 403, "DNS rebinding"),
    ({"Origin": "http://evil.example:{port}"}, "evil.example:{port}", 403, "DNS rebinding"),
])
def test_cross_site_control_is_refused_without_a_token(open_server, headers, host, status, words):
    base, _ = open_server
    port = _port(base)
    before = get_json(base + "/status")["prompt"]
    headers = {k: v.format(port=port) if v else v for k, v in headers.items()}
    reply = _post(base, "/prompt", b'{"prompt": "pwned"}', dict(headers, Authorization=None),
                  host=host.format(port=port) if host else None)
    code, body = _status_and_json(reply)
    assert (code, words in body["error"]) == (status, True), body
    assert get_json(base + "/status")["prompt"] == before


@pytest.mark.parametrize("origin, host", [(None, "127.0.0.1:{port}"), ("http://127.0.0.1:{port}", "127.0.0.1:{port}"),
                                          ("http://localhost:{port}", "localhost:{port}")])
def test_the_servers_own_page_and_plain_clients_still_control_it(open_server, origin, host):
    base, _ = open_server
    port = _port(base)
    prompt = f"a green square {origin} {host}"
    reply = _post(base, "/prompt", json.dumps({"prompt": prompt}).encode(),
                  {"Origin": origin.format(port=port) if origin else None, "Authorization": None},
                  host=host.format(port=port))
    code, body = _status_and_json(reply)
    assert code == 200, body
    assert get_json(base + "/status")["prompt"] == prompt


def test_the_aiohttp_client_gets_the_same_answers(open_server):
    import aiohttp

    base, _ = open_server

    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/prompt", data='{"prompt": "x"}',
                                    headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 415 and "application/json" in (await r.json())["error"]
            async with session.post(base + "/prompt", json={"prompt": "via aiohttp"},
                                    headers={"Origin": "http://attacker.localtest.me"}) as r:
                assert r.status == 403
            async with session.post(base + "/prompt", json={"prompt": "via aiohttp"}) as r:
                assert r.status == 200 and (await r.json())["prompt"] == "via aiohttp"

    asyncio.run(asyncio.wait_for(run(), 30))


# ---------------------------------------------------------------- 8. playlist items shorter than a block
def test_a_playlist_item_shorter_than_one_block_is_refused(server):
    base, _ = server
    body = json.dumps({"items": [{"prompt": "a", "duration_s": 1e-9}]}).encode()
    code, reply = _status_and_json(_post(base, "/playlist", body, method="PUT"))
    # FAST_SAMPLING: kvcache blocks of 1 latent frame = 4 output frames at 12 fps
    assert code == 400 and "shorter than one generated block (0.333333 s)" in reply["error"], reply
    body = json.dumps({"items": [{"prompt": "a", "duration_s": 0.34}, {"prompt": "b", "duration_s": 60}]}).encode()
    assert _status_and_json(_post(base, "/playlist", body, method="PUT"))[0] == 200


# ---------------------------------------------------------------- 7. kill -9
def _hls_folder(proc) -> Path:
    found = re.search(r"HLS files in (\S+)", proc.output())
    assert found, proc.output()
    return Path(found.group(1))


def test_state_file_and_hls_folder_survive_kill_minus_nine(official_dir, tmp_path):
    state = tmp_path / "state.json"
    playlist = {"loop": True, "items": [{"prompt": "a red circle", "duration_s": 3600},
                                        {"prompt": "a blue square", "duration_s": 60}]}
    with running_server(official_dir, "--state", str(state)) as (base, proc):
        assert _status_and_json(_post(base, "/playlist", json.dumps(playlist).encode(), method="PUT"))[0] == 200
        assert _status_and_json(_post(base, "/prompt", b'{"prompt": "a manual yellow star"}'))[0] == 200
        first_folder = _hls_folder(proc)
        assert first_folder.is_dir()
        child = get_json(base + "/status")["generator_process"]["pid"]
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(timeout=30)
        # the generator process dies with its parent (PDEATHSIG), not left running on its own
        wait_until(lambda: process_gone(child), 5, lambda: f"generator process {child} outlived its killed server")
        saved = json.loads(state.read_text())  # whole JSON: written to a temp file, fsynced, renamed
        assert saved["prompt"]["prompt"] == "a manual yellow star"
        assert [i["prompt"] for i in saved["playlist"]["items"]] == ["a red circle", "a blue square"]
        assert first_folder.is_dir()  # left behind by the dead process...
        assert not list(tmp_path.glob(".state.json.*.tmp"))

    with running_server(official_dir, "--state", str(state)) as (base, proc):
        assert not first_folder.exists()  # ...and reaped by the next start
        assert _hls_folder(proc).is_dir()
        status = get_json(base + "/status")
        assert status["prompt"] == "a manual yellow star"  # the manual prompt holds until the next item
        listed = get_json(base + "/playlist")
        assert [i["prompt"] for i in listed["items"]] == ["a red circle", "a blue square"] and listed["loop"]
        assert listed["position"]["index"] == 0
        assert "resumed the prompt and playlist" in proc.output()


def test_a_live_servers_hls_folder_is_left_alone(official_dir):
    with running_server(official_dir) as (_, first):
        with running_server(official_dir) as (_, second):
            assert _hls_folder(first).is_dir() and _hls_folder(second).is_dir()
            assert _hls_folder(first) != _hls_folder(second)


# ---------------------------------------------------------------- 9. SIGTERM with --state
def test_sigterm_with_state_exits_0_after_the_final_save(official_dir, tmp_path):
    state = tmp_path / "state.json"
    with running_server(official_dir, "--state", str(state)) as (base, proc):
        wait_until(state.exists, 10, lambda: "the state file was never written")
        state.unlink()  # only the save made while stopping can bring it back
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        output = proc.output()
    assert code == 0 and "Traceback" not in output, output[-3000:]
    assert json.loads(state.read_text())["version"] == 1


# ---------------------------------------------------------------- 10. clients that ask and never read
def _pipeline_without_reading(port: int, request: bytes, count: int) -> socket.socket:
    """A connection that sends `count` pipelined requests (as many as the server takes: sends never
    block) and never reads; a small receive buffer makes the answers back up fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    data = request * count
    try:
        while data:
            data = data[sock.send(data):]
    except BlockingIOError:
        pass  # the server stopped reading: it holds enough of them
    return sock


def _server_connections(server_port: int) -> int:
    """Established connections on the server's side of `server_port` (/proc/net/tcp, state 01)."""
    local = f"0100007F:{server_port:04X}"
    return sum(1 for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
               if line.split()[1] == local and line.split()[3] == "01")


def test_pipelining_clients_that_never_read_are_dropped_within_the_write_deadline(official_dir):
    deadline_s = 2.0
    with running_server(official_dir, "--stall-timeout", str(deadline_s)) as (base, proc):
        port = _port(base)
        fds_before = get_json(base + "/status")["open_fds"]
        # The player script (389 kB) fills a loopback connection's buffers (megabytes: Linux grows
        # them) in a few answers; the page (6.7 kB) would too, after a few hundred answers' CPU time.
        request = f"GET /static/hls.light.min.js HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        sockets = [_pipeline_without_reading(port, request, 40) for _ in range(50)]
        sent = time.monotonic()
        try:
            assert _server_connections(port) >= 50
            # Each connection's first answers fill its buffers within a moment; the answer that finds
            # them full has `deadline_s` to go out, then the connection is dropped.
            wait_until(lambda: _server_connections(port) == 0, deadline_s + 8.0,
                       lambda: f"{_server_connections(port)} of 50 still open {time.monotonic() - sent:.1f} s on")
            took = time.monotonic() - sent
            wait_until(lambda: get_json(base + "/status")["open_fds"] <= fds_before, 3.0,
                       lambda: f"fds {get_json(base + '/status')['open_fds']} > {fds_before} after the drops")
            status = get_json(base + "/status")
            assert status["client_write_timeouts"] >= 50, (took, status, proc.output()[-3000:])
        finally:
            for sock in sockets:
                sock.close()
        assert took <= deadline_s + 8.0 and proc.poll() is None
        assert get_json(base + "/healthz")["ok"]


# ---------------------------------------------------------------- 11. parser differential: aiohttp is the oracle
H = b"Host: x\r\n"
DIFFERENTIAL = {
    "bare CR hides Content-Length": b"GET /healthz HTTP/1.1\r\n" + H + b"X: a\rContent-Length: 5\r\n\r\nhello",
    "bare CR hides Transfer-Encoding": b"GET /healthz HTTP/1.1\r\n" + H + b"X: a\rTransfer-Encoding: chunked\r\n\r\n",
    "obs-fold Content-Length": b"GET /healthz HTTP/1.1\r\n" + H + b"Content-Length:\r\n 5\r\n\r\nhello",
    "NUL in a header name": b"GET /healthz HTTP/1.1\r\n" + H + b"X-\x00a: 1\r\n\r\n",
    "duplicate Host": b"GET /healthz HTTP/1.1\r\n" + H + H + b"\r\n",
    "missing Host": b"GET /healthz HTTP/1.1\r\n\r\n",
    "header line without colon": b"GET /healthz HTTP/1.1\r\n" + H + b"NoColonHere\r\n\r\n",
    "129 headers": b"GET /healthz HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(129)) + b"\r\n",
    "CL and TE": b"POST /healthz HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two CLs": b"POST /healthz HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "chunked, bad size": b"POST /healthz HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "absurd header size": b"GET /healthz HTTP/1.1\r\n" + H + b"X: " + b"a" * 70000 + b"\r\n\r\n",
    "HTTP/1.0 keep-alive": b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "pipelined after malformed": b"GET /healthz HTTP/1.1\r\nBad\r\n\r\nGET /healthz HTTP/1.1\r\n" + H + b"\r\n",
}


def _status_and_open(port: int, data: bytes) -> tuple[bytes, bool]:
    """(the first answer's status code, whether the connection stayed open 0.5 s after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        status = reply.split(b"\r\n", 1)[0].split(b" ")[1:2]
        sock.settimeout(0.5)
        try:
            while sock.recv(65536):
                pass
            still_open = False
        except socket.timeout:
            still_open = True
        except ConnectionResetError:
            still_open = False
    return (status[0] if status else b""), still_open


def test_hostile_requests_are_answered_as_plain_aiohttp_answers_them(server):
    import threading

    from aiohttp import web

    base, _ = server
    oracle_port = free_port()
    ready, loop_box = threading.Event(), {}

    def oracle():
        async def healthz(_request):
            return web.Response(text="ok")

        async def main():
            app = web.Application()
            app.router.add_route("*", "/healthz", healthz)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", oracle_port).start()
            loop_box["stop"] = asyncio.Event()
            ready.set()
            await loop_box["stop"].wait()
            await runner.cleanup()

        loop_box["loop"] = loop = asyncio.new_event_loop()
        loop.run_until_complete(main())

    thread = threading.Thread(target=oracle, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        mismatches, seen = {}, {}
        for name, data in DIFFERENTIAL.items():
            ours, theirs = _status_and_open(_port(base), data), _status_and_open(oracle_port, data)
            assert theirs[0].isdigit(), (name, theirs)  # the oracle answered: a comparison, not two silences
            seen[name] = theirs
            if ours != theirs:
                mismatches[name] = {"skyrt": ours, "aiohttp": theirs}
        assert not mismatches, mismatches
        assert {status for status, _ in seen.values()} >= {b"200", b"400"}, seen
    finally:
        loop_box["loop"].call_soon_threadsafe(loop_box["stop"].set)
        thread.join(10)
