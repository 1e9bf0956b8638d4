"""Prompt control for the stream: typed prompt changes, the looping playlist, and one board that
the HTTP side writes and the generator thread reads.

A playlist is what a signage operator sets once and forgets:

    {"loop": true, "items": [{"prompt": "a red circle bouncing", "duration_s": 30},
                             {"prompt": "a blue square orbiting", "duration_s": 20, "transition": "recache"}]}

Item times run on *stream time* (output frames / fps), so a slow generator stretches nothing and a
restart after an error does not skip items. A manual prompt (POST /prompt) holds until the
playlist's next item starts.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

TRANSITIONS = ("continue", "recache")  # keep the cached history / re-commit it under the new prompt


class RequestError(ValueError):
    """Bad control input; the message names the field and the fix (becomes a 4xx JSON error)."""


@dataclass(frozen=True)
class PromptChange:
    """One validated prompt switch."""

    prompt: str
    negative_prompt: str | None = None
    transition: str = "continue"


@dataclass(frozen=True)
class PlaylistItem:
    prompt: str
    duration_s: float
    negative_prompt: str | None = None
    transition: str = "continue"

    def change(self) -> PromptChange:
        return PromptChange(self.prompt, self.negative_prompt, self.transition)


@dataclass(frozen=True)
class Playlist:
    items: tuple[PlaylistItem, ...]
    loop: bool = True

    def to_json(self) -> dict:
        return {"loop": self.loop, "items": [asdict(item) for item in self.items]}


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may send."""

    max_prompt_chars: int = 2000
    max_playlist_items: int = 256
    max_duration_s: float = 24 * 3600.0
    # The shortest playlist item: a prompt applies at the next generated block, so an item shorter
    # than one block would switch every frame. StreamServer sets it to one block of its stream.
    min_duration_s: float = 0.0


def _check_fields(obj, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise RequestError(f"{where} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise RequestError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(obj))
    if missing:
        raise RequestError(f"{where}: missing field(s) {missing}")


def _text(value, name: str, limits: Limits, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limits.max_prompt_chars:
        raise RequestError(f"{name} has {len(value)} characters; the limit is {limits.max_prompt_chars}")
    if not allow_empty and not value.strip():
        raise RequestError(f"{name} must not be empty")
    return value


def _transition(value, name: str) -> str:
    if value not in TRANSITIONS:
        raise RequestError(f"{name} must be one of {list(TRANSITIONS)}, got {value!r}")
    return value


def parse_prompt_change(obj, limits: Limits = Limits()) -> PromptChange:
    """{"prompt": str, "negative_prompt"?: str, "transition"?: "continue"|"recache"} -> PromptChange."""
    _check_fields(obj, {"prompt", "negative_prompt", "transition"}, {"prompt"}, "body")
    negative = obj.get("negative_prompt")
    return PromptChange(
        _text(obj["prompt"], "prompt", limits),
        None if negative is None else _text(negative, "negative_prompt", limits, allow_empty=True),
        _transition(obj.get("transition", "continue"), "transition"),
    )


def parse_playlist(obj, limits: Limits = Limits()) -> Playlist:
    """{"loop"?: bool, "items": [{"prompt", "duration_s", "negative_prompt"?, "transition"?}, ...]}."""
    _check_fields(obj, {"loop", "items"}, {"items"}, "playlist")
    loop = obj.get("loop", True)
    if not isinstance(loop, bool):
        raise RequestError(f"playlist.loop must be true or false, got {loop!r}")
    items = obj["items"]
    if not isinstance(items, list):
        raise RequestError(f"playlist.items must be a list, got {type(items).__name__}")
    if len(items) > limits.max_playlist_items:
        raise RequestError(f"playlist has {len(items)} items; the limit is {limits.max_playlist_items}")
    parsed = []
    for i, item in enumerate(items):
        where = f"playlist.items[{i}]"
        _check_fields(item, {"prompt", "duration_s", "negative_prompt", "transition"}, {"prompt", "duration_s"}, where)
        duration = item["duration_s"]
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not (
                0 < duration <= limits.max_duration_s):
            raise RequestError(f"{where}.duration_s must be a number of seconds in (0, {limits.max_duration_s:g}], "
                               f"got {duration!r}")
        if duration < limits.min_duration_s:
            raise RequestError(f"{where}.duration_s is {duration:g} s, shorter than one generated block "
                               f"({limits.min_duration_s:g} s), so the prompt would never show; use at least "
                               f"{limits.min_duration_s:g}")
        negative = item.get("negative_prompt")
        parsed.append(PlaylistItem(
            _text(item["prompt"], f"{where}.prompt", limits), float(duration),
            None if negative is None else _text(negative, f"{where}.negative_prompt", limits, allow_empty=True),
            _transition(item.get("transition", "continue"), f"{where}.transition")))
    return Playlist(tuple(parsed), loop)


def load_playlist(path: str | Path, limits: Limits = Limits()) -> Playlist:
    """Read a playlist JSON file (the same form PUT /playlist takes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"playlist file not found: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(f"{path}: not valid JSON ({err})") from err
    try:
        playlist = parse_playlist(obj, limits)
    except RequestError as err:
        raise RequestError(f"{path}: {err}") from err
    if not playlist.items:
        raise RequestError(f"{path}: the playlist has no items")
    return playlist


class PromptBoard:
    """The one owner of "what should the stream show": the manual prompt, the playlist and its
    position. HTTP handlers write it; the pacer calls `tick` with stream time; the generator thread
    reads `current` when it (re)starts and receives changes through `subscribe`.
    """

    def __init__(self, initial: PromptChange, playlist: Playlist | None = None):
        self._lock = threading.Lock()
        self._current = initial
        self._listener = None
        self._playlist: Playlist | None = None
        self._index = 0
        self._item_started_s = 0.0
        self._now_s = 0.0
        self.switches = 0
        self._on_step = None
        if playlist is not None and playlist.items:
            self._start_playlist(playlist, 0.0)

    # -- read side
    @property
    def current(self) -> PromptChange:
        with self._lock:
            return self._current

    def subscribe(self, listener) -> None:
        """`listener(change)` is called (from the writer's thread) on every switch."""
        with self._lock:
            self._listener = listener

    def on_playlist_step(self, callback) -> None:
        """`callback()` is called (from the pacer thread, lock held: keep it quick) when the playlist
        moves to its next item by itself."""
        self._on_step = callback

    def snapshot(self) -> dict:
        """The state worth keeping across a restart, as JSON-able data (see `restore`)."""
        with self._lock:
            playlist = None
            if self._playlist is not None:
                playlist = dict(self._playlist.to_json(), index=self._index,
                                elapsed_s=round(self._now_s - self._item_started_s, 3))
            return {"prompt": asdict(self._current), "playlist": playlist}

    def restore(self, state: dict, limits: Limits = Limits()) -> None:
        """Resume a `snapshot`: the playlist at its item and elapsed time, then the prompt that was
        showing (a manual prompt holds until the next item, as it did). Raises RequestError on a
        state that does not validate."""
        if not isinstance(state, dict):
            raise RequestError("state must be a JSON object")
        saved = state.get("playlist")
        playlist, index, elapsed = None, 0, 0.0
        if saved is not None:
            if not isinstance(saved, dict):
                raise RequestError("state.playlist must be an object or null")
            playlist = parse_playlist({k: saved[k] for k in ("loop", "items") if k in saved}, limits)
            index, elapsed = saved.get("index", 0), saved.get("elapsed_s", 0.0)
            if not (isinstance(index, int) and 0 <= index < max(1, len(playlist.items))) or not isinstance(
                    elapsed, (int, float)):
                raise RequestError(f"state.playlist index {index!r} / elapsed_s {elapsed!r} do not fit its items")
        change = parse_prompt_change(state.get("prompt"), limits)
        with self._lock:
            self._playlist = playlist if playlist is not None and playlist.items else None
            self._index, self._item_started_s = index, self._now_s - float(elapsed)
            self._switch(change)

    def playlist_json(self) -> dict:
        with self._lock:
            if self._playlist is None:
                return {"loop": False, "items": [], "position": None}
            return dict(self._playlist.to_json(), position={
                "index": self._index, "elapsed_s": round(self._now_s - self._item_started_s, 3)})

    # -- write side
    def set_prompt(self, change: PromptChange) -> None:
        with self._lock:
            self._switch(change)

    def set_playlist(self, playlist: Playlist) -> None:
        """Replace the playlist and start its first item now; an empty playlist just stops it."""
        with self._lock:
            if playlist.items:
                self._start_playlist(playlist, self._now_s)
            else:
                self._playlist = None

    def tick(self, stream_time_s: float) -> None:
        """Advance the playlist to stream time `stream_time_s` (called by the pacer per output frame)."""
        with self._lock:
            self._now_s = stream_time_s
            playlist = self._playlist
            if playlist is None:
                return
            item = playlist.items[self._index]
            if stream_time_s - self._item_started_s < item.duration_s:
                return
            nxt = self._index + 1
            if nxt >= len(playlist.items):
                if not playlist.loop:
                    self._playlist = None  # the last item's prompt stays on screen
                    if self._on_step is not None:
                        self._on_step()
                    return
                nxt = 0
            self._index, self._item_started_s = nxt, stream_time_s
            self._switch(playlist.items[nxt].change())
            if self._on_step is not None:
                self._on_step()

    # -- internals (lock held)
    def _start_playlist(self, playlist: Playlist, now_s: float) -> None:
        self._playlist, self._index, self._item_started_s = playlist, 0, now_s
        self._switch(playlist.items[0].change())

    def _switch(self, change: PromptChange) -> None:
        self._current = change
        self.switches += 1
        if self._listener is not None:
            self._listener(change)
