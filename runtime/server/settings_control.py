"""A running server's generation settings over HTTP: the "HTTP control" layer of the stream's request.

    GET  /settings   every generation setting: its value in the request the stream runs, the layer it
                     came from (default, command, model, preset, user, derived) and the source in that layer
    PUT  /settings   {"shift": 8.0, ...}: the HTTP control layer becomes exactly these values     [token]
    POST /settings   {"shift": 8.0, ...}: these values are added to (or replace theirs in) that layer [token]

The layer is a user layer like a CLI flag, an API keyword or a fleet YAML key (runtime/resolve.py,
surface HTTP_CONTROL), over the values the server was started with: the request is resolved again
from all layers, so "set by the user" is membership in the layer, never equality with a default
(`{"shift": 8.0}` on a preset whose shift is 5 runs with 8), and PUT {} gives every value back to the
layers below. A value the preset cannot honour is 409 naming both layers; an unknown key, a wrong
type or a value the request refuses is 400 with the fix. The new request runs from the next chunk
boundary: the generator ends its stream after the chunk in hand and opens a new one (new noise, new
cache, the prompt of the moment), in its child process too. If that stream fails before its first
chunk (a setting only the pipeline can refuse), the settings before the change come back and GET
/settings shows the error. With `--state FILE` the layer is saved with the prompt and the playlist and
resumed at the next start.

Not settable here, each with its reason: the prompt (POST /prompt, the playlist), the frame size and
fps (the encoders and the players' streams are built for them), the output kind (a server sends frames).
"""
from __future__ import annotations

import difflib
import logging
import math
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..request import SETTINGS, setting_type, stream_setting_names
from ..resolve import LayerConflict

if TYPE_CHECKING:
    from ..resolve import Resolution

log = logging.getLogger("skyrt.server")

PATH = "/settings"
# Stream settings a running server keeps, and what to do instead.
FIXED = {
    "prompt": 'switch prompts with POST /prompt {"prompt": "..."} or PUT /playlist',
    "negative_prompt": 'switch it with the prompt: POST /prompt {"prompt": "...", "negative_prompt": "..."}',
    "height": "the frame size is fixed while the server runs (its encoders and players' streams are built for it): "
              "restart skyrt serve with --height/--width",
    "width": "the frame size is fixed while the server runs (its encoders and players' streams are built for it): "
             "restart skyrt serve with --height/--width",
    "fps": "the output rate is fixed while the server runs (the pacer and encoders run at it): restart skyrt serve "
           "with --fps",
    "output": "a server streams frames; output is a setting of Pipeline.stream",
}
SETTABLE = tuple(name for name in stream_setting_names() if name not in FIXED)
_FIELDS = {f.name: f for f in SETTINGS}
_CLI_NAMES = {f.metadata["cli"].replace("-", "_"): f.name for f in SETTINGS if f.metadata["cli"]}
MAX_STRING = 64  # the longest value a settable string field has ('kvcache'); a bound on what is echoed back
MAX_INT = 2**63 - 1
PROMPT_SOURCE = "the prompt of the moment: --prompt, POST /prompt or the playlist"


class SettingsRefusal(Exception):
    """Why a settings change is refused: an HTTP status and a message naming the problem and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_settings(body: Any) -> dict[str, Any]:
    """The settings of a PUT/POST body, type-checked (ints as ints, numbers as floats, strings, booleans,
    null where a setting takes None); SettingsRefusal(400) naming the key, the problem and the fix."""
    if not isinstance(body, dict):
        raise SettingsRefusal(400, f'the body must be a JSON object of settings, e.g. {{"shift": 8.0}}; got '
                                   f"{type(body).__name__}")
    return {key: _checked(key, value) for key, value in body.items()}


def _checked(key: str, value: Any) -> Any:
    if key in FIXED:
        raise SettingsRefusal(400, f'"{key}" cannot be set here: {FIXED[key]}')
    if key not in SETTABLE:
        raise SettingsRefusal(400, f'unknown setting "{_clipped(key)}"{_did_you_mean(key)}; settable: '
                                   f"{', '.join(SETTABLE)} (GET {PATH} lists them with their values)")
    f = _FIELDS[key]
    kind, optional = setting_type(f), "None" in f.type
    if value is None:
        if optional:
            return None
        raise SettingsRefusal(400, f'"{key}" cannot be null; leave it out of the body to keep the value of the '
                                   f"layers below")
    example = {bool: "true", int: "4", float: "8.0", str: '"kvcache"'}[kind]
    wrong = SettingsRefusal(400, f'"{key}" must be {_kind_name(kind)}{" or null" if optional else ""}, got '
                                 f'{_json_type(value)}; e.g. "{key}": {example}')
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if isinstance(value, bool):
        raise wrong
    if kind is int:
        if not isinstance(value, int):
            raise wrong
        if abs(value) > MAX_INT:
            raise SettingsRefusal(400, f'"{key}" is out of range (|value| <= {MAX_INT})')
        return value
    if kind is float:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong
        return float(value)
    if not isinstance(value, str):
        raise wrong
    if len(value) > MAX_STRING:
        raise SettingsRefusal(400, f'"{key}" is {len(value)} characters long; its values are short names '
                                   f"(at most {MAX_STRING})")
    return value


def _kind_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _clipped(key: str) -> str:
    return key if len(key) <= MAX_STRING else key[:MAX_STRING] + "..."


def _did_you_mean(key: str) -> str:
    """' (did you mean "x"?)' for a command-line name (steps) or a near miss, else ''."""
    if key.replace("-", "_") in _CLI_NAMES:
        return f' (the command line calls it --{key.replace("_", "-")}; here it is "{_CLI_NAMES[key.replace("-", "_")]}")'
    close = difflib.get_close_matches(key, SETTABLE, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


class SettingsControl:
    """The HTTP control layer of one StreamServer: validated changes resolved into a new request that the
    generator adopts at its next chunk boundary; its description (GET) and its saved form (--state)."""

    def __init__(self, server):
        """server: the StreamServer (stream_server.py, which makes this; not imported: no cycle)."""
        self.server = server
        self.layer: dict[str, Any] = {}
        self.last_error: dict | None = None  # the last change that failed when its stream opened
        self._lock = threading.Lock()  # one change at a time (HTTP, a revert on the generator thread)

    def apply(self, values: dict[str, Any], merge: bool) -> None:
        """Make the layer `values` (merge: the layer updated with them), resolve the request from every
        layer and hand it to the generator. SettingsRefusal(409) on a conflict with the preset,
        SettingsRefusal(400) on a value the request refuses; nothing changes then."""
        with self._lock:
            layer = {**self.layer, **values} if merge else dict(values)
            resolution = self._resolve(layer)
            before = (self.layer, self.server.resolution)
            self.layer, self.last_error = layer, None
            self.server.adopt(resolution, on_failure=lambda error: self._revert(before, resolution, error))
        log.info("HTTP settings %s: the stream restarts at the next chunk boundary", layer or "cleared")

    def _resolve(self, layer: dict[str, Any]) -> "Resolution":
        settings = replace(self.server.settings, control=layer)
        try:
            return self.server.pipe.resolve(settings, stream=True)
        except LayerConflict as err:
            raise SettingsRefusal(409, str(err)) from err
        except (ValueError, TypeError) as err:
            raise SettingsRefusal(400, str(err)) from err

    def _revert(self, before: tuple, failed: "Resolution", error: Exception) -> None:
        """The generator thread: the stream of `failed` could not start; put back what it replaced."""
        with self._lock:
            if self.server.request != failed.request:
                return  # a newer change came meanwhile: it is the one running now
            failed_layer = self.layer
            self.layer = before[0]
            self.last_error = {"settings": failed_layer, "error": f"{type(error).__name__}: {error}"[:1000],
                               "reverted_to": before[0]}
            self.server.adopt(before[1])
        try:
            self.server.save_state()
        except OSError as err:
            log.warning("could not save state after reverting the HTTP settings: %s", err)

    def describe(self) -> dict:
        """GET /settings: every setting's value, layer and source; the layer as set; whether it runs yet."""
        server = self.server
        with self._lock:
            resolution, layer, last_error = server.resolution, dict(self.layer), self.last_error
        current = server.board.current
        shown = {"prompt": current.prompt, "negative_prompt": current.negative_prompt
                 if current.negative_prompt is not None else resolution.request.negative_prompt}
        settings = {}
        for f in SETTINGS:
            source = resolution.source(f.name)
            if f.name in shown:
                entry = {"value": shown[f.name], "layer": "user", "source": PROMPT_SOURCE}
            else:
                value = None if f.name == "num_frames" else getattr(resolution.request, f.name)  # endless
                entry = {"value": value, "layer": source.layer, "source": source.detail or f"{source.layer} layer"}
            settings[f.name] = dict(entry, settable=f.name in SETTABLE)
        running = server.generator.running_resolution
        return {"settings": settings, "http_control": layer,
                "running": running is not None and running.request == resolution.request, "last_error": last_error}

    def snapshot(self) -> dict:
        """What --state keeps: the layer as set."""
        with self._lock:
            return {"values": dict(self.layer)}

    def restore(self, state: dict | None) -> bool:
        """At start: the layer saved in a state file (`StateFile.load()`), resolved over this start's
        settings. One that no longer resolves (other flags, another preset) is reported and left out."""
        saved = (state or {}).get("settings")
        if not saved:
            return False
        try:
            if not isinstance(saved, dict):
                raise SettingsRefusal(400, "state.settings must be an object")
            self.apply(parse_settings(saved.get("values", {})), merge=False)
        except SettingsRefusal as err:
            log.warning("ignoring the HTTP settings saved in the state file: %s", err.message)
            return False
        log.info("resumed the HTTP settings %s", self.layer)
        return True


def add_settings_routes(app, server, control, error) -> None:
    """GET, PUT and POST /settings on `app` (app.py's `control` wrapper: token, bounded JSON, state save)."""
    from aiohttp import web

    async def get_settings(_request):
        return web.json_response(server.settings_control.describe(), headers={"Cache-Control": "no-cache, no-store"})

    def change(merge: bool):
        async def handler(_request, body):
            try:
                server.settings_control.apply(parse_settings(body), merge=merge)
            except SettingsRefusal as err:
                return error(err.status, err.message)
            return web.json_response(dict(server.settings_control.describe(), ok=True,
                                          applies="at the next chunk boundary"))
        return handler

    app.router.add_get(PATH, get_settings)
    app.router.add_put(PATH, control(change(merge=False)))
    app.router.add_post(PATH, control(change(merge=True)))
