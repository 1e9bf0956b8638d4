"""Schedules: what the stream shows by the wall clock (`skyrt serve --schedule FILE`, GET/PUT /schedule).

A schedule is a list of entries, each starting at a wall-clock time in one IANA time zone:

    {"timezone": "Europe/Berlin", "entries": [
        {"at": "07:00", "prompt": "a sunrise over the harbour"},                        # every day
        {"at": "12:00", "days": ["mon", "tue", "wed", "thu", "fri"],
         "playlist": {"items": [{"prompt": "the lunch menu", "duration_s": 30},
                                {"prompt": "the canteen", "duration_s": 30}]}},        # weekdays only
        {"at": "18:30", "prompt": "the lobby at night", "transition": "recache"},
        {"at": "09:00", "date": "2026-12-24", "prompt": "snow on the roofs"}]}        # once

An entry names a prompt (with "negative_prompt", "transition", "image" / "video" as a playlist item has
them, playlist.py) or a whole playlist (which then loops, or not, as its "loop" says). The entry active at
an instant t is the one whose latest start is <= t, looking back across midnight and across days: with the
entries above, 03:00 on a Tuesday shows the Monday 18:30 entry. Before any entry has ever started (a
schedule of one-off entries, all in the future) the server shows what it would without a schedule.

Switches happen between generated blocks: the generator asks `ScheduleRunner.check` after each block, so
an entry takes over at the first block boundary at or after its start (the block index and how late the
switch was are in /status and /metrics). The switch takes the same path as POST /prompt / PUT /playlist.
A manual prompt or playlist set while a schedule runs holds until the schedule's next entry starts.

Time-zone rules (zoneinfo, so daylight saving is the zone's own):
- a start inside a spring-forward gap (02:30 where clocks jump from 02:00 to 03:00) happens when the gap
  ends, at the jump (03:00 new time); two entries in the same gap then start together and the later
  wall time wins;
- a start inside a fall-back repeat (02:30 where 02:00-03:00 happens twice) happens once, at the first
  02:30 (the earlier, summer-time one).

Validation is up front (a file at start, a body at PUT): an unknown zone, a bad time or date, an unknown
weekday, two entries that could start at the same instant, an empty schedule (a file; an empty PUT stops
the schedule), more than MAX_ENTRIES entries, and `--schedule` with `--playlist` are refused with the
entry and the fix named. With `--state FILE` the schedule is saved and, at the next start, the entry
active for the wall-clock time then is shown: transitions missed while the server was down are not
replayed, and if the entry that was showing is still the active one, the saved prompt / playlist
position stays as it was.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .playlist import (STARTS, Limits, Playlist, PlaylistItem, PromptBoard, RequestError, _check_fields, _start_file,
                       _text, _transition, parse_playlist)

log = logging.getLogger("skyrt.server")

PATH = "/schedule"
MAX_ENTRIES = 256
MAX_FILE_BYTES = 1024 * 1024
DEFAULT_TIMEZONE = "UTC"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Recurring entries occur at least once a week: looking this many days back (ahead) from t finds the
# active (next) start whenever there is a recurring entry.
_SCAN_DAYS = 8
ENTRY_FIELDS = {"at", "days", "date", "name", "prompt", "negative_prompt", "transition", "playlist", *STARTS}


@dataclass(frozen=True)
class ScheduleEntry:
    """One start: `at` local wall time, on `days` (weekday numbers, Monday 0; None: every day) or once on
    `date`; shows `item`'s prompt (a PlaylistItem whose duration is unused) or runs `playlist`."""

    at: dt.time
    item: PlaylistItem | None = None
    playlist: Playlist | None = None
    days: frozenset[int] | None = None
    date: dt.date | None = None
    name: str | None = None

    def label(self) -> str:
        """'07:00 on mon,fri' / '07:00 every day' / '07:00 on 2026-12-24': for messages and /status."""
        when = (f"on {self.date.isoformat()}" if self.date is not None else "every day" if self.days is None
                else "on " + ",".join(WEEKDAYS[d] for d in sorted(self.days)))
        return f"{_hhmm(self.at)} {when}"

    def occurs_on(self, day: dt.date) -> bool:
        if self.date is not None:
            return day == self.date
        return self.days is None or day.weekday() in self.days

    def to_json(self) -> dict:
        out: dict = {"at": _hhmm(self.at)}
        if self.name is not None:
            out["name"] = self.name
        if self.days is not None:
            out["days"] = [WEEKDAYS[d] for d in sorted(self.days)]
        if self.date is not None:
            out["date"] = self.date.isoformat()
        if self.playlist is not None:
            out["playlist"] = self.playlist.to_json()
        else:
            out.update({k: v for k, v in self.item.to_json().items() if k != "duration_s"})
        return out


@dataclass(frozen=True)
class Schedule:
    """Validated entries in one time zone (see the module's docstring for what is active when)."""

    entries: tuple[ScheduleEntry, ...]
    timezone: str = DEFAULT_TIMEZONE

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def to_json(self) -> dict:
        return {"timezone": self.timezone, "entries": [entry.to_json() for entry in self.entries]}

    def occurrence(self, index: int, day: dt.date) -> dt.datetime:
        """The instant (aware, UTC) entry `index` starts on local date `day` (DST rules: module docstring)."""
        return local_instant(day, self.entries[index].at, self.zone)

    def _day_starts(self, day: dt.date) -> list[tuple[dt.datetime, dt.time, int]]:
        """(start instant in UTC, wall time, entry index) of the entries starting on local date `day`, sorted
        so that of equal instants (starts in one spring-forward gap) the later wall time comes last."""
        return sorted((self.occurrence(i, day), e.at, i) for i, e in enumerate(self.entries) if e.occurs_on(day))

    def active_at(self, t: dt.datetime) -> tuple[int, dt.datetime] | None:
        """(entry index, its start instant) of the entry showing at aware instant t: the latest start
        <= t. None before any entry has started."""
        _check_aware(t)
        today = t.astimezone(self.zone).date()
        # A local day's starts all come before the next day's: the first day back with one started wins.
        for back in range(_SCAN_DAYS + 1):
            past = [o for o in self._day_starts(today - dt.timedelta(days=back)) if o[0] <= t]
            if past:
                return past[-1][2], past[-1][0]
        # No recurring entry (they start at least weekly): the latest one-off, however long ago.
        past = sorted((self.occurrence(i, e.date), e.at, i) for i, e in enumerate(self.entries)
                      if e.date is not None and self.occurrence(i, e.date) <= t)
        return (past[-1][2], past[-1][0]) if past else None

    def next_after(self, t: dt.datetime) -> tuple[int, dt.datetime] | None:
        """(entry index, start instant) of the next start after aware instant t; None if none is left
        (one-off entries only, all past)."""
        _check_aware(t)
        today = t.astimezone(self.zone).date()
        for ahead in range(_SCAN_DAYS + 1):
            later = [o for o in self._day_starts(today + dt.timedelta(days=ahead)) if o[0] > t]
            if later:
                return self._last_of_first(later)
        later = sorted((self.occurrence(i, e.date), e.at, i) for i, e in enumerate(self.entries)
                       if e.date is not None and self.occurrence(i, e.date) > t)
        return self._last_of_first(later) if later else None

    @staticmethod
    def _last_of_first(starts: list) -> tuple[int, dt.datetime]:
        """Of sorted starts, the earliest instant; of several at it, the later wall time (it wins the tie)."""
        first = [o for o in starts if o[0] == starts[0][0]][-1]
        return first[2], first[0]


def _check_aware(t: dt.datetime) -> None:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"schedule times must be timezone-aware datetimes, got naive {t!r}")


def _hhmm(at: dt.time) -> str:
    return at.strftime("%H:%M:%S" if at.second else "%H:%M")


@functools.lru_cache(maxsize=16384)  # the same few days' starts are asked for at every boundary and /status
def local_instant(day: dt.date, at: dt.time, zone: ZoneInfo) -> dt.datetime:
    """The UTC instant the wall time `at` on `day` names in `zone`. A repeated wall time (fall back) is
    its first occurrence; a missing one (spring forward) is the end of the gap, the instant of the jump."""
    naive = dt.datetime.combine(day, at)
    first = naive.replace(tzinfo=zone, fold=0).astimezone(dt.timezone.utc)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        return first  # exists (fold=0 is the earlier of two when it is repeated)
    # In a gap: fold=1 reads it with the offset after the jump, giving an instant before the jump; fold=0
    # with the offset before, an instant after it. The jump lies in between: find it to the second.
    low = naive.replace(tzinfo=zone, fold=1).astimezone(dt.timezone.utc)
    high = first
    before = low.astimezone(zone).utcoffset()
    while high - low > dt.timedelta(seconds=1):
        mid = low + (high - low) / 2
        if mid.astimezone(zone).utcoffset() == before:
            low = mid
        else:
            high = mid
    return high.replace(microsecond=0)


# ------------------------------------------------------------------------------------ validation
def parse_timezone(value, where: str = "schedule.timezone") -> str:
    """A valid IANA zone name (`Europe/Berlin`, `UTC`), or RequestError naming the fix."""
    if not isinstance(value, str) or not value or len(value) > 64 or "\x00" in value:
        raise RequestError(f"{where} must be an IANA time zone name such as \"Europe/Berlin\" or \"UTC\", "
                           f"got {value!r}")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise RequestError(f"{where}: unknown time zone {value!r}; use an IANA name such as \"Europe/Berlin\", "
                           "\"America/New_York\" or \"UTC\" (the system's zoneinfo, or pip install tzdata)") from None
    return value


def _time(value, where: str) -> dt.time:
    if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 18:30 as 1110 (base 60)
        hint = f'at: "{value // 60:02d}:{value % 60:02d}"' if 0 <= value < 24 * 60 else 'at: "HH:MM"'
        raise RequestError(f"{where}.at is the number {value}: YAML reads an unquoted time such as 18:30 as a "
                           f"number (base 60); quote it: {hint}")
    match = _TIME.match(value) if isinstance(value, str) else None
    if match is None:
        raise RequestError(f"{where}.at must be a 24-hour time \"HH:MM\" or \"HH:MM:SS\" (00:00 to 23:59:59), "
                           f"got {value!r}")
    return dt.time(int(match[1]), int(match[2]), int(match[3] or 0))


def _days(value, where: str) -> frozenset[int]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError(f"{where}.days must be a non-empty list of weekdays such as [\"mon\", \"fri\"] (leave it "
                           f"out for every day), got {value!r}")
    days = set()
    for day in value:
        name = day.strip().lower() if isinstance(day, str) else None
        if name in WEEKDAYS:
            days.add(WEEKDAYS.index(name))
        elif name in _FULL_DAYS:
            days.add(_FULL_DAYS.index(name))
        else:
            raise RequestError(f"{where}.days: unknown weekday {day!r}; use {', '.join(WEEKDAYS)}")
    return frozenset(days)


def _date(value, where: str) -> dt.date:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):  # YAML reads 2026-12-24 as a date
        return value
    if isinstance(value, str) and _DATE.match(value):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise RequestError(f"{where}.date must be a calendar date \"YYYY-MM-DD\", got {value!r}")


def _entry(obj, where: str, limits: Limits) -> ScheduleEntry:
    _check_fields(obj, ENTRY_FIELDS, {"at"}, where)
    at = _time(obj["at"], where)
    where = f"{where} ({_hhmm(at)})"
    if obj.get("date") is not None and obj.get("days") is not None:
        raise RequestError(f"{where}: a dated entry happens once; give either date or days, not both")
    days = None if obj.get("days") is None else _days(obj["days"], where)
    date = None if obj.get("date") is None else _date(obj["date"], where)
    name = obj.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise RequestError(f"{where}.name must be a string of at most 200 characters")
    has_playlist, has_prompt = obj.get("playlist") is not None, obj.get("prompt") is not None
    if has_playlist == has_prompt:
        raise RequestError(f"{where}: give either prompt (with negative_prompt, transition, image or video) or "
                           "playlist, exactly one")
    if has_playlist:
        extra = sorted(k for k in ("negative_prompt", "transition", *STARTS) if obj.get(k) is not None)
        if extra:
            raise RequestError(f"{where}: {extra} belong to a prompt entry; put them on the playlist's items")
        try:
            playlist = parse_playlist(obj["playlist"], limits)
        except RequestError as err:
            raise RequestError(f"{where}.{err}") from None
        if not playlist.items:
            raise RequestError(f"{where}.playlist has no items; give at least one")
        return ScheduleEntry(at, playlist=playlist, days=days, date=date, name=name)
    return ScheduleEntry(at, item=_item(obj, where, limits), days=days, date=date, name=name)


def _item(obj: dict, where: str, limits: Limits) -> PlaylistItem:
    """An entry's prompt as a PlaylistItem (duration unused: the entry lasts until the next one)."""
    starts = [kind for kind in STARTS if obj.get(kind) is not None]
    if len(starts) > 1:
        raise RequestError(f"{where}: give either image or video, not both")
    start_path = _start_file(obj[starts[0]], f"{where}.{starts[0]}", starts[0], limits) if starts else None
    negative = obj.get("negative_prompt")
    return PlaylistItem(
        _text(obj["prompt"], f"{where}.prompt", limits), 0.0,
        None if negative is None else _text(negative, f"{where}.negative_prompt", limits, allow_empty=True),
        _transition(obj.get("transition", "continue"), f"{where}.transition"),
        obj.get("image"), obj.get("video"), start_path)


def _overlap(a: ScheduleEntry, b: ScheduleEntry) -> bool:
    """Whether two entries at the same wall time can start on the same day."""
    if a.date is not None and b.date is not None:
        return a.date == b.date
    if a.date is not None or b.date is not None:
        dated, other = (a, b) if a.date is not None else (b, a)
        return other.occurs_on(dated.date)
    return a.days is None or b.days is None or bool(a.days & b.days)


def parse_schedule(obj, limits: Limits = Limits(), default_timezone: str = DEFAULT_TIMEZONE,
                   allow_empty: bool = True) -> Schedule:
    """{"timezone"?: IANA name, "entries": [{"at": "HH:MM", "days"? | "date"?, "name"?, "prompt" ... |
    "playlist": {...}}, ...]} -> Schedule; RequestError naming the entry and the fix."""
    _check_fields(obj, {"timezone", "entries"}, {"entries"}, "schedule")
    timezone = parse_timezone(obj.get("timezone", default_timezone))
    entries = obj["entries"]
    if not isinstance(entries, list):
        raise RequestError(f"schedule.entries must be a list, got {type(entries).__name__}")
    if len(entries) > MAX_ENTRIES:
        raise RequestError(f"schedule has {len(entries)} entries; the limit is {MAX_ENTRIES}")
    if not entries and not allow_empty:
        raise RequestError("the schedule has no entries; give at least one, e.g. "
                           "{\"entries\": [{\"at\": \"07:00\", \"prompt\": \"a sunrise\"}]}")
    parsed = [_entry(entry, f"schedule.entries[{i}]", limits) for i, entry in enumerate(entries)]
    for j, b in enumerate(parsed):
        for i, a in enumerate(parsed[:j]):
            if a.at == b.at and _overlap(a, b):
                raise RequestError(f"schedule.entries[{j}] ({b.label()}) starts at the same time as entries[{i}] "
                                   f"({a.label()}); give one of them another time, or days that do not overlap")
    return Schedule(tuple(parsed), timezone)


def load_schedule(path: str | Path, limits: Limits = Limits(), default_timezone: str = DEFAULT_TIMEZONE) -> Schedule:
    """Read a schedule file: YAML (.yaml / .yml) or JSON, the form PUT /schedule takes. Its entries' image /
    video files are named relative to limits.media_dir, or to the file's own folder when the server has none."""
    path = Path(path)
    if limits.media_dir is None:
        limits = replace(limits, media_dir=str(path.parent))
    if not path.is_file():
        raise FileNotFoundError(f"schedule file not found: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise RequestError(f"{path}: {path.stat().st_size} bytes; a schedule file is at most {MAX_FILE_BYTES}")
    text = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise RequestError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the schedule "
                               "as JSON") from None
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RequestError(f"{path}: not valid YAML ({err})") from None
    else:
        try:
            obj = json.loads(text)
        except ValueError as err:
            raise RequestError(f"{path}: not valid JSON ({err}); name a .yaml file for YAML") from None
    try:
        return parse_schedule(obj, limits, default_timezone, allow_empty=False)
    except RequestError as err:
        raise RequestError(f"{path}: {err}") from None


# ------------------------------------------------------------------------------------ running it
def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class ScheduleRunner:
    """Runs a Schedule on a PromptBoard: `check(block)` between generated blocks switches to the entry
    active now (the clock is `now()`, injectable: tests do not sleep); `set` replaces the schedule (HTTP);
    `snapshot` / `restore` keep it across a restart (--state)."""

    def __init__(self, board: PromptBoard, clock: Callable[[], dt.datetime] | None = None,
                 default_timezone: str = DEFAULT_TIMEZONE):
        self.board, self.clock, self.default_timezone = board, clock or _utc_now, default_timezone
        self._lock = threading.Lock()
        self.schedule: Schedule | None = None
        self._applied: tuple[int, dt.datetime] | None = None  # (entry, start) the board shows
        self._next_check: dt.datetime | None = None  # nothing to do before this instant (None: look now)
        self._set_at: dt.datetime | None = None  # when the schedule was set (a PUT's switch is late from there)
        self.current: dict | None = None  # the last switch: entry, start, block, latency
        self.transitions = 0
        self.last_latency_s: float | None = None
        self.on_switch: Callable[[], None] | None = None  # e.g. the state saver's mark_dirty

    # -- write side
    def set(self, schedule: Schedule | None) -> None:
        """Replace the schedule (None, or no entries: stop it; the board keeps what it shows). The entry
        active now takes over at the next block boundary."""
        with self._lock:
            self.schedule = schedule if schedule is not None and schedule.entries else None
            self._applied, self._next_check, self.current = None, None, None
            self._set_at = self.clock()

    def select_now(self) -> None:
        """At start, before any block: show the entry active now at once (no replay of missed ones)."""
        self.check(block=0)

    def check(self, block: int) -> bool:
        """Between blocks (`block`: blocks generated so far, the index of the next): switch the board to
        the entry active now if it is not the one shown. True if it switched."""
        with self._lock:
            schedule = self.schedule
            if schedule is None:
                return False
            now = self.clock()
            if self._next_check is not None and now < self._next_check:
                return False  # the common case: one comparison per block
            active = schedule.active_at(now)
            upcoming = schedule.next_after(now)
            # nothing can change before the next start (none left: never again, until a new schedule)
            self._next_check = dt.datetime.max.replace(tzinfo=dt.timezone.utc) if upcoming is None else upcoming[1]
            if active is None or active == self._applied:
                return False
            self._applied = active
            index, start = active
            late = now - max(start, self._set_at or start)
            self.last_latency_s = max(0.0, late.total_seconds())
            self.transitions += 1
            self.current = {"index": index, "start": start, "block": block, "latency_s": self.last_latency_s,
                            "switched_at": now}
            entry = schedule.entries[index]
        self._show(entry)
        log.info("schedule: entry %d (%s) from block %d, %.3f s after its start", index, entry.label(), block,
                 self.last_latency_s)
        if self.on_switch is not None:
            self.on_switch()
        return True

    def _show(self, entry: ScheduleEntry) -> None:
        """The same path as PUT /playlist and POST /prompt: the board's listener forwards the change."""
        if entry.playlist is not None:
            self.board.set_playlist(entry.playlist)
        else:
            self.board.set_playlist(Playlist(()))  # a playlist running must not override the entry's prompt
            self.board.set_prompt(entry.item.change())

    # -- read side
    def describe(self) -> dict:
        """GET /schedule: the schedule, the entry showing and the next one (None when there is none)."""
        with self._lock:
            schedule = self.schedule
            body = schedule.to_json() if schedule is not None else {"timezone": self.default_timezone, "entries": []}
        return dict(body, **self.status_fields())

    def status(self) -> dict | None:
        """/status's "schedule": None without one."""
        with self._lock:
            if self.schedule is None:
                return None
            timezone = self.schedule.timezone
        return {"timezone": timezone, **self.status_fields()}

    def status_fields(self) -> dict:
        with self._lock:
            schedule, current = self.schedule, self.current
        if schedule is None:
            return {"current": None, "next": None, "transitions": self.transitions}
        upcoming = schedule.next_after(self.clock())
        zone = schedule.zone
        shown = None
        if current is not None:
            entry = schedule.entries[current["index"]]
            shown = {"index": current["index"], "at": _hhmm(entry.at), "label": entry.label(), "name": entry.name,
                     "started_at": current["start"].astimezone(zone).isoformat(), "block": current["block"],
                     "latency_s": round(current["latency_s"], 3),
                     "switched_at": current["switched_at"].astimezone(zone).isoformat()}
        nxt = None
        if upcoming is not None:
            entry = schedule.entries[upcoming[0]]
            nxt = {"index": upcoming[0], "at": _hhmm(entry.at), "label": entry.label(), "name": entry.name,
                   "starts_at": upcoming[1].astimezone(zone).isoformat()}
        return {"current": shown, "next": nxt, "transitions": self.transitions}

    def prometheus(self) -> str:
        """/metrics lines: transitions, the last switch's lateness, the entry showing."""
        with self._lock:
            index = -1 if self.current is None else self.current["index"]
            latency = float("nan") if self.last_latency_s is None else self.last_latency_s
            transitions = self.transitions
        return (f"# HELP skyrt_schedule_transitions_total Schedule entries switched to at a block boundary.\n"
                f"# TYPE skyrt_schedule_transitions_total counter\nskyrt_schedule_transitions_total {transitions}\n"
                f"# HELP skyrt_schedule_switch_latency_seconds How long after its start the last entry took over.\n"
                f"# TYPE skyrt_schedule_switch_latency_seconds gauge\n"
                f"skyrt_schedule_switch_latency_seconds {latency:.6g}\n"
                f"# HELP skyrt_schedule_entry The index of the schedule entry showing (-1: none).\n"
                f"# TYPE skyrt_schedule_entry gauge\nskyrt_schedule_entry {index}\n")

    # -- --state
    def snapshot(self) -> dict | None:
        """What --state keeps: the schedule and the occurrence the board shows."""
        with self._lock:
            if self.schedule is None:
                return None
            applied = None if self._applied is None else {"index": self._applied[0],
                                                          "start": self._applied[1].isoformat()}
            return dict(self.schedule.to_json(), applied=applied)

    def restore(self, state: dict | None, limits: Limits) -> bool:
        """At start: the schedule saved in a state file (StateFile.load()), then the entry active now. If
        that is the occurrence that was showing, the board's restored prompt / playlist position stays;
        otherwise the active entry is shown (missed transitions are not replayed). A saved schedule that
        no longer validates (a media file gone) is reported and left out. False if none was saved."""
        if not isinstance(state, dict) or "schedule" not in state:
            return False  # no state, or one from before schedules: --schedule runs
        saved = state["schedule"]
        if saved is None:  # stopped by an empty PUT /schedule: it stays stopped, as a stopped playlist does
            self.set(None)
            return True
        try:
            if not isinstance(saved, dict):
                raise RequestError("state.schedule must be an object")
            schedule = parse_schedule({k: saved[k] for k in ("timezone", "entries") if k in saved}, limits,
                                      self.default_timezone)
        except RequestError as err:
            log.warning("ignoring the schedule saved in the state file: %s", err)
            return False
        self.set(schedule)
        applied = saved.get("applied")
        active = schedule.active_at(self.clock())
        try:
            was = None if applied is None else (int(applied["index"]), dt.datetime.fromisoformat(applied["start"]))
        except (KeyError, TypeError, ValueError):
            was = None
        if active is not None and was == active:
            with self._lock:  # still the same occurrence: keep what the board resumed (a manual prompt too)
                self._applied, self.current = active, {"index": active[0], "start": active[1], "block": 0,
                                                       "latency_s": 0.0, "switched_at": self.clock()}
        log.info("resumed the schedule (%d entries, %s)", len(schedule.entries), schedule.timezone)
        return True


def add_schedule_routes(app, server, control) -> None:
    """GET /schedule (open, like GET /playlist) and PUT /schedule (app.py's `control`: token, bounded JSON,
    state save) on `app`."""
    from aiohttp import web

    async def get_schedule(_request):
        return web.json_response(server.schedule.describe(), headers={"Cache-Control": "no-cache, no-store"})

    async def put_schedule(_request, body):
        schedule = parse_schedule(body, server.limits, server.config.timezone)
        server.schedule.set(schedule)
        return web.json_response(dict(server.schedule.describe(), ok=True, applies="at the next block boundary"))

    app.router.add_get(PATH, get_schedule)
    app.router.add_put(PATH, control(put_schedule))


__all__ = ["DEFAULT_TIMEZONE", "MAX_ENTRIES", "Schedule", "ScheduleEntry", "ScheduleRunner", "WEEKDAYS",
           "add_schedule_routes", "load_schedule", "local_instant", "parse_schedule", "parse_timezone"]
