"""Prompt control for the stream: typed prompt changes, the looping playlist, and one board that
the HTTP side writes and the generator thread reads.

A playlist is what a signage operator sets once and forgets:

    {"loop": true, "items": [{"prompt": "a red circle bouncing", "duration_s": 30},
                             {"prompt": "a blue square orbiting", "duration_s": 20, "transition": "recache"},
                             {"prompt": "the lobby at night", "duration_s": 20, "image": "lobby.png"}]}

An item with "image" or "video" (a causal preset's start, runtime/stream_start.py) starts a new stream
from that file instead of switching the prompt: the file is named relative to the server's media
folder (`skyrt serve --media-dir DIR`; for `--playlist FILE`, that file's folder by default) and must
lie inside it; it is checked when the playlist is set, so a bad file is a 4xx, never a generator crash.

Item times run on *stream time* (output frames / fps), so a slow generator stretches nothing and a
restart after an error does not skip items. A manual prompt (POST /prompt) holds until the
playlist's next item starts.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

TRANSITIONS = ("continue", "recache")  # keep the cached history / re-commit it under the new prompt
STARTS = ("image", "video")  # what a playlist item may start a new stream from


class RequestError(ValueError):
    """Bad control input; the message names the field and the fix (becomes a 4xx JSON error)."""


@dataclass(frozen=True)
class PromptChange:
    """One validated prompt switch."""

    prompt: str
    negative_prompt: str | None = None
    transition: str = "continue"
    # A new stream from a file instead of a prompt switch: (kind in STARTS, absolute path). Not part of
    # the JSON a client sends or the state file keeps (the playlist item that set it is).
    start: tuple[str, str] | None = field(default=None, compare=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "start"}


@dataclass(frozen=True)
class PlaylistItem:
    prompt: str
    duration_s: float
    negative_prompt: str | None = None
    transition: str = "continue"
    image: str | None = None  # as given, relative to the media folder
    video: str | None = None
    start_path: str | None = field(default=None, compare=False, repr=False)  # the file, resolved

    def change(self) -> PromptChange:
        kind = "image" if self.image is not None else "video" if self.video is not None else None
        return PromptChange(self.prompt, self.negative_prompt, self.transition,
                            None if kind is None else (kind, self.start_path))

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "start_path" and (v is not None or k not in STARTS)}


@dataclass(frozen=True)
class Playlist:
    items: tuple[PlaylistItem, ...]
    loop: bool = True

    def to_json(self) -> dict:
        return {"loop": self.loop, "items": [item.to_json() for item in self.items]}


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may send."""

    max_prompt_chars: int = 2000
    max_playlist_items: int = 256
    max_duration_s: float = 24 * 3600.0
    # The shortest playlist item: a prompt applies at the next generated block, so an item shorter
    # than one block would switch every frame. StreamServer sets it to one block of its stream.
    min_duration_s: float = 0.0
    # The folder playlist items' image / video files are named in (None: items cannot start from files).
    media_dir: str | None = None


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


def _start_file(value, where: str, kind: str, limits: Limits) -> str:
    """A playlist item's image / video: a relative name inside the media folder, of a file that opens as
    one; its resolved path. Checked here so that a bad file is the client's error, not the generator's."""
    if limits.media_dir is None:
        raise RequestError(f"{where}: playlist items start from files only when the server has a media folder "
                           "(skyrt serve --media-dir DIR, or --playlist FILE, whose folder it then is)")
    if not isinstance(value, str) or not value or len(value) > 1024 or "\x00" in value:
        raise RequestError(f"{where} must be a file name inside the media folder, got {value!r}")
    root = Path(limits.media_dir).resolve()
    path = (root / value).resolve()
    if Path(value).is_absolute() or not path.is_relative_to(root):
        raise RequestError(f"{where}: {value!r} is outside the media folder; name a file inside it, relative to it")
    if not path.is_file():
        raise RequestError(f"{where}: no file {value!r} in the media folder")
    try:
        _check_opens(path, kind)
    except Exception as err:  # any decoder error is the file's fault here
        raise RequestError(f"{where}: {value!r} is not {'an image' if kind == 'image' else 'a video'} "
                           f"that can be read ({type(err).__name__}: {err})") from None
    return str(path)


def _check_opens(path: Path, kind: str) -> None:
    if kind == "image":
        from PIL import Image

        with Image.open(path) as image:
            image.verify()
        return
    import av

    with av.open(str(path)) as container:  # the first frame decodes (a header alone proves little)
        if not container.streams.video:
            raise ValueError("it has no video stream")
        next(container.decode(video=0))


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
    """{"loop"?: bool, "items": [{"prompt", "duration_s", "negative_prompt"?, "transition"?, "image"? | "video"?}, ...]}."""
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
        _check_fields(item, {"prompt", "duration_s", "negative_prompt", "transition", *STARTS}, {"prompt", "duration_s"},
                      where)
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
        starts = [kind for kind in STARTS if item.get(kind) is not None]
        if len(starts) > 1:
            raise RequestError(f"{where}: give either image or video, not both")
        start_path = _start_file(item[starts[0]], f"{where}.{starts[0]}", starts[0], limits) if starts else None
        parsed.append(PlaylistItem(
            _text(item["prompt"], f"{where}.prompt", limits), float(duration),
            None if negative is None else _text(negative, f"{where}.negative_prompt", limits, allow_empty=True),
            _transition(item.get("transition", "continue"), f"{where}.transition"),
            item.get("image"), item.get("video"), start_path))
    return Playlist(tuple(parsed), loop)


def load_playlist(path: str | Path, limits: Limits = Limits()) -> Playlist:
    """Read a playlist JSON file (the same form PUT /playlist takes); its items' image / video files are
    named relative to limits.media_dir, or to the file's own folder when the server has none."""
    path = Path(path)
    if limits.media_dir is None:
        limits = replace(limits, media_dir=str(path.parent))
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
            return {"prompt": self._current.to_json(), "playlist": playlist}

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
        if playlist is not None and playlist.items and playlist.items[index].change() == change:
            change = playlist.items[index].change()  # the item's start too (the state keeps only its name)
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
