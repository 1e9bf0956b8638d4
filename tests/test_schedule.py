"""Wall-clock schedules (runtime/server/schedule.py): which entry shows at an instant, daylight saving both
ways, weekdays, one-off dates, the wrap at midnight, validation; the switch at a block boundary on the real
generator loop (a tiny checkpoint, a fake clock driven by the generator's block count, so nothing sleeps);
GET/PUT /schedule on the server's app; the schedule kept across a restart with --state.

The instants expected are written out in UTC from the zones' published rules (Europe/Berlin: clocks go
forward at 01:00 UTC on 2026-03-29 and back at 01:00 UTC on 2026-10-25; America/New_York: forward at 07:00
UTC on 2026-03-08), not computed with the code under test.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
from zoneinfo import ZoneInfo

import pytest
from serving import TOKEN, PassThroughStream, until

from skyrt.runtime.server.playlist import PromptBoard, PromptChange, RequestError
from skyrt.runtime.server.schedule import (MAX_ENTRIES, ScheduleRunner, load_schedule, local_instant,
                                           parse_schedule)

UTC = dt.timezone.utc
BERLIN = "Europe/Berlin"
# The tiny checkpoint is bidirectional; its kvcache streams say so once per stream.
pytestmark = pytest.mark.filterwarnings("ignore:this checkpoint was trained with bidirectional attention")


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def sched(*entries: dict, timezone: str = BERLIN):
    return parse_schedule({"timezone": timezone, "entries": list(entries)})


def prompt_at(schedule, t: dt.datetime) -> str | None:
    active = schedule.active_at(t)
    if active is None:
        return None
    entry = schedule.entries[active[0]]
    return entry.item.prompt if entry.item is not None else "playlist"


# ------------------------------------------------------------------------------------ pure logic
def test_daily_entries_wrap_at_midnight():
    s = sched({"at": "07:00", "prompt": "morning"}, {"at": "18:30", "prompt": "evening"})
    # 2026-12-08 is in winter time: Berlin = UTC+1.
    assert s.active_at(utc(2026, 12, 8, 2, 0)) == (1, utc(2026, 12, 7, 17, 30))  # 03:00 local: yesterday's 18:30
    assert prompt_at(s, utc(2026, 12, 8, 5, 59, 59)) == "evening"
    assert s.active_at(utc(2026, 12, 8, 6, 0)) == (0, utc(2026, 12, 8, 6, 0))  # a start is active at its instant
    assert s.next_after(utc(2026, 12, 8, 6, 0)) == (1, utc(2026, 12, 8, 17, 30))
    assert s.next_after(utc(2026, 12, 8, 20, 0)) == (0, utc(2026, 12, 9, 6, 0))  # over midnight


def test_weekdays_and_the_entry_that_carries_over_the_weekend():
    s = sched({"at": "08:00", "days": ["mon", "tue", "wed", "thu", "fri"], "prompt": "office"},
              {"at": "10:00", "days": ["Saturday"], "prompt": "market"},
              {"at": "20:00", "days": ["sun"], "prompt": "sunday night"})
    # Week of 2026-12-07 (a Monday), UTC+1.
    assert prompt_at(s, utc(2026, 12, 12, 8, 0)) == "office"  # Saturday 09:00: Friday's 08:00
    assert prompt_at(s, utc(2026, 12, 12, 9, 0)) == "market"  # Saturday 10:00
    assert prompt_at(s, utc(2026, 12, 13, 18, 59)) == "market"  # Sunday 19:59
    assert prompt_at(s, utc(2026, 12, 14, 6, 59)) == "sunday night"  # Monday 07:59
    assert s.next_after(utc(2026, 12, 11, 20, 0)) == (1, utc(2026, 12, 12, 9, 0))  # Friday night -> Saturday 10:00


def test_a_dated_entry_happens_once_and_holds_until_the_next_start():
    s = sched({"at": "07:00", "prompt": "daily"}, {"at": "09:00", "date": "2026-12-24", "prompt": "snow"})
    assert prompt_at(s, utc(2026, 12, 24, 7, 59)) == "daily"
    assert prompt_at(s, utc(2026, 12, 24, 8, 0)) == "snow"
    assert prompt_at(s, utc(2026, 12, 25, 5, 0)) == "snow"  # 06:00 on the 25th: nothing started since
    assert prompt_at(s, utc(2026, 12, 25, 6, 0)) == "daily"
    assert prompt_at(s, utc(2027, 12, 24, 8, 0)) == "daily"  # not every year
    future = sched({"at": "09:00", "date": "2027-01-01", "prompt": "new year"})
    assert future.active_at(utc(2026, 12, 31, 0, 0)) is None  # nothing has started: the server's own prompt
    assert future.next_after(utc(2026, 12, 31, 0, 0)) == (0, utc(2027, 1, 1, 8, 0))
    assert future.next_after(utc(2027, 1, 2, 0, 0)) is None and prompt_at(future, utc(2027, 6, 1)) == "new year"


def test_spring_forward_a_start_in_the_gap_happens_at_the_jump():
    # Berlin 2026-03-29: 02:00 CET becomes 03:00 CEST at 01:00 UTC; 02:00-02:59 does not exist.
    s = sched({"at": "02:15", "prompt": "early"}, {"at": "02:45", "prompt": "late"}, {"at": "03:15", "prompt": "after"},
              {"at": "12:00", "prompt": "noon"})
    assert s.next_after(utc(2026, 3, 28, 12, 0)) == (1, utc(2026, 3, 29, 1, 0))  # both at the jump: the later wins
    assert s.active_at(utc(2026, 3, 29, 1, 0)) == (1, utc(2026, 3, 29, 1, 0))
    assert s.active_at(utc(2026, 3, 29, 1, 14)) == (1, utc(2026, 3, 29, 1, 0))
    assert s.active_at(utc(2026, 3, 29, 1, 15)) == (2, utc(2026, 3, 29, 1, 15))  # 03:15 CEST, order kept
    assert s.active_at(utc(2026, 3, 30, 0, 15)) == (0, utc(2026, 3, 30, 0, 15))  # the next day: 02:15 CEST again
    new_york = ZoneInfo("America/New_York")
    assert local_instant(dt.date(2026, 3, 8), dt.time(2, 30), new_york) == utc(2026, 3, 8, 7, 0)  # 03:00 EDT


def test_fall_back_a_repeated_start_happens_once_at_its_first_occurrence():
    # Berlin 2026-10-25: 03:00 CEST becomes 02:00 CET at 01:00 UTC; 02:00-02:59 happens twice.
    s = sched({"at": "02:30", "prompt": "twice?"}, {"at": "12:00", "prompt": "noon"})
    assert s.next_after(utc(2026, 10, 24, 12, 0)) == (0, utc(2026, 10, 25, 0, 30))  # 02:30 CEST, the first
    assert s.active_at(utc(2026, 10, 25, 1, 30)) == (0, utc(2026, 10, 25, 0, 30))  # 02:30 CET: no second start
    assert s.next_after(utc(2026, 10, 25, 0, 30)) == (1, utc(2026, 10, 25, 11, 0))  # then noon CET


BAD = [
    ({"timezone": "Mars/Olympus", "entries": [{"at": "07:00", "prompt": "a"}]}, "unknown time zone 'Mars/Olympus'"),
    ({"entries": [{"at": "25:00", "prompt": "a"}]}, r"entries\[0\]\.at must be a 24-hour time"),
    ({"entries": [{"at": "7:00", "prompt": "a"}]}, r'"HH:MM"'),
    ({"entries": [{"at": 1110, "prompt": "a"}]}, r'quote it: at: "18:30"'),
    ({"entries": [{"at": "07:00", "prompt": "a"}, {"at": "07:00", "prompt": "b"}]},
     r"entries\[1\] \(07:00 every day\) starts at the same time as entries\[0\]"),
    ({"entries": [{"at": "07:00", "days": ["mon"], "prompt": "a"},
                  {"at": "07:00", "days": ["tue", "mon"], "prompt": "b"}]},
     r"days that do not overlap"),
    ({"entries": [{"at": "09:00", "days": ["thu"], "prompt": "a"},
                  {"at": "09:00", "date": "2026-12-24", "prompt": "b"}]},
     r"entries\[1\] \(09:00 on 2026-12-24\) starts at the same time"),  # the 24th is a Thursday
    ({"entries": [{"at": "07:00", "days": ["funday"], "prompt": "a"}]}, r"unknown weekday 'funday'; use mon, tue"),
    ({"entries": [{"at": "07:00", "days": [], "prompt": "a"}]}, r"non-empty list of weekdays"),
    ({"entries": [{"at": "07:00", "date": "2026-02-30", "prompt": "a"}]}, r"calendar date"),
    ({"entries": [{"at": "07:00", "date": "2026-12-24", "days": ["mon"], "prompt": "a"}]}, r"either date or days"),
    ({"entries": [{"at": "07:00"}]}, r"give either prompt .* or playlist, exactly one"),
    ({"entries": [{"at": "07:00", "prompt": "a", "playlist": {"items": []}}]}, r"exactly one"),
    ({"entries": [{"at": "07:00", "playlist": {"items": [{"prompt": "x", "duration_s": -1}]}}]},
     r"entries\[0\] \(07:00\)\.playlist\.items\[0\]\.duration_s"),
    ({"entries": [{"at": "07:00", "prompt": "a", "when": "now"}]}, r"unknown field\(s\) \['when'\]"),
    ({"entries": [{"at": f"{i // 60:02d}:{i % 60:02d}", "prompt": "a"} for i in range(MAX_ENTRIES + 1)]},
     rf"the limit is {MAX_ENTRIES}"),
    ({"timezone": "UTC"}, r"missing field\(s\) \[.entries.\]"),
    ({"items": []}, r"unknown field\(s\) \[.items.\]"),
]


@pytest.mark.parametrize("body,message", BAD)
def test_bad_schedules_are_refused_naming_the_entry_and_the_fix(body, message):
    with pytest.raises(RequestError, match=message):
        parse_schedule(body)


def test_non_overlapping_days_at_one_time_are_fine_and_an_empty_file_is_not(tmp_path):
    s = parse_schedule({"entries": [{"at": "07:00", "days": ["mon"], "prompt": "a"},
                                    {"at": "07:00", "days": ["tue"], "prompt": "b"}]})
    assert s.timezone == "UTC" and len(s.entries) == 2
    empty = tmp_path / "empty.json"
    empty.write_text('{"entries": []}')
    with pytest.raises(RequestError, match=r"empty\.json: the schedule has no entries"):
        load_schedule(empty)


def test_yaml_file_with_quoted_times_and_the_unquoted_time_trap(tmp_path):
    good = tmp_path / "day.yaml"
    good.write_text('timezone: Europe/Berlin\nentries:\n  - at: "07:00"\n    prompt: a sunrise\n'
                    '  - at: "18:30"\n    date: 2026-12-24\n    prompt: the lobby at night\n')
    s = load_schedule(good, default_timezone="UTC")
    assert s.timezone == BERLIN and s.entries[1].date == dt.date(2026, 12, 24)
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  - at: 18:30\n    prompt: x\n")
    with pytest.raises(RequestError, match=r'bad\.yaml: schedule\.entries\[0\]\.at is the number 1110.*"18:30"'):
        load_schedule(bad)
    assert load_schedule(good, default_timezone="Asia/Tokyo").timezone == BERLIN  # the file's zone wins
    plain = tmp_path / "plain.json"
    plain.write_text('{"entries": [{"at": "07:00", "prompt": "a"}]}')
    assert load_schedule(plain, default_timezone="Asia/Tokyo").timezone == "Asia/Tokyo"  # --timezone fills it in


class FakeClock:
    def __init__(self, t: dt.datetime):
        self.t = t

    def __call__(self) -> dt.datetime:
        return self.t


def test_runner_switches_at_starts_a_manual_prompt_holds_until_the_next_entry_and_a_playlist_entry_runs():
    clock = FakeClock(utc(2026, 12, 8, 5, 0))  # 06:00 Berlin
    board = PromptBoard(PromptChange("own prompt"))
    runner = ScheduleRunner(board, clock)
    runner.set(sched({"at": "07:00", "prompt": "morning"}, {"at": "18:00", "playlist": {"items": [
        {"prompt": "menu", "duration_s": 10}, {"prompt": "canteen", "duration_s": 10}]}}))
    assert runner.check(0)  # 06:00: yesterday's 18:00 playlist entry
    assert board.current.prompt == "menu" and runner.current["block"] == 0
    board.tick(10.0)
    assert board.current.prompt == "canteen"  # the entry's playlist runs on stream time
    clock.t = utc(2026, 12, 8, 6, 0, 2)
    assert runner.check(7) and board.current.prompt == "morning" and runner.current["block"] == 7
    assert runner.last_latency_s == 2.0
    board.tick(30.0)
    assert board.current.prompt == "morning"  # the playlist stopped with its entry
    board.set_prompt(PromptChange("manual"))
    clock.t = utc(2026, 12, 8, 12, 0)
    assert not runner.check(8) and board.current.prompt == "manual"  # holds until the next start
    clock.t = utc(2026, 12, 8, 17, 0)
    assert runner.check(9) and board.current.prompt == "menu"
    assert runner.transitions == 3 and runner.status()["next"]["starts_at"] == "2026-12-09T07:00:00+01:00"


# ------------------------------------------------------------------------------------ on the real stream
FAST = {"height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 1.0, "mode": "kvcache", "fps": 12}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = utc(2026, 12, 8, 9, 0)  # 10:00 Berlin


class Recording:
    """A real pipeline whose streams record the prompt each chunk was made with."""

    def __init__(self, pipe):
        self.pipe, self.prompts = pipe, []

    def resolve(self, settings, stream=False):
        return self.pipe.resolve(settings, stream=stream)

    def stream(self, **settings):
        return _Recorded(self.pipe.stream(**settings), self.prompts)


class _Recorded(PassThroughStream):
    def __init__(self, inner, prompts):
        super().__init__(inner)
        self.prompts = prompts

    def __next__(self):
        chunk = next(self.inner)
        self.prompts.append(self.inner.prompt)  # the prompt this chunk was denoised with
        return chunk


def _block_clock(holder: list):
    """Wall time T0 + one second per block generated: the block boundaries are whole seconds after T0."""
    return lambda: T0 + dt.timedelta(seconds=holder[0].generator.blocks if holder else 0)


def _run_app(server, scenario):
    from aiohttp.test_utils import TestClient, TestServer

    from skyrt.runtime.server import create_app

    async def run():
        async with TestClient(TestServer(create_app(server))) as client:
            return await scenario(client)

    return asyncio.run(run())


def test_the_switch_happens_at_the_first_block_boundary_at_or_after_the_start(official_pipeline):
    from skyrt.runtime.server import ServerConfig, StreamServer

    # The clock reads 10:00:0k after block k: the first boundary at or after 10:00:06 is the one after block
    # 6 (0-based blocks 0-5 are made), so blocks 0-5 show "before" and block 6 on "after". An entry switched
    # to exactly at its start is 0 s late.
    schedule = sched({"at": "06:00", "prompt": "before"}, {"at": "10:00:06", "prompt": "after"})
    pipe, holder = Recording(official_pipeline), []
    server = StreamServer(pipe, FAST, ServerConfig(formats=("mjpeg",), token=TOKEN), prompt=PromptChange("own"),
                          schedule=schedule, clock=_block_clock(holder))
    holder.append(server)

    async def scenario(client):
        await until(lambda: len(pipe.prompts) >= 9)
        status = await (await client.get("/status")).json()
        metrics = await (await client.get("/metrics")).text()
        return status, metrics

    status, metrics = _run_app(server, scenario)
    assert pipe.prompts[:6] == ["before"] * 6 and pipe.prompts[6:9] == ["after"] * 3, pipe.prompts
    current = status["schedule"]["current"]
    assert (current["index"], current["block"], current["latency_s"]) == (1, 6, 0.0)
    assert current["started_at"] == "2026-12-08T10:00:06+01:00"
    assert status["schedule"]["next"]["starts_at"] == "2026-12-09T06:00:00+01:00"
    assert "skyrt_schedule_transitions_total 2" in metrics and "skyrt_schedule_entry 1" in metrics


def test_put_and_get_schedule_over_http_with_400_401_413(official_pipeline):
    from skyrt.runtime.server import ServerConfig, StreamServer

    pipe = Recording(official_pipeline)
    server = StreamServer(pipe, FAST, ServerConfig(formats=("mjpeg",), token=TOKEN, timezone=BERLIN),
                          prompt=PromptChange("own"), clock=lambda: T0)

    async def scenario(client):
        await until(lambda: len(pipe.prompts) >= 1)
        empty = await (await client.get("/schedule")).json()
        body = {"entries": [{"at": "09:30", "prompt": "put prompt", "name": "morning"},
                            {"at": "20:00", "days": ["tue"], "prompt": "tuesday night"}]}
        no_token = await client.put("/schedule", json=body)
        bad = await client.put("/schedule", json={"entries": [{"at": "09:30", "days": ["xyz"], "prompt": "a"}]},
                               headers=AUTH)
        not_json = await client.put("/schedule", data=b"{entries",
                                    headers=dict(AUTH, **{"Content-Type": "application/json"}))
        huge = await client.put("/schedule", json={"entries": [{"at": "09:30", "prompt": "a" * 70_000}]}, headers=AUTH)
        good = await client.put("/schedule", json=body, headers=AUTH)
        reply = await good.json()
        await until(lambda: pipe.prompts[-1] == "put prompt")
        got = await (await client.get("/schedule")).json()
        stop = await client.put("/schedule", json={"entries": []}, headers=AUTH)
        stopped = await stop.json()
        return (empty, no_token.status, bad.status, await bad.json(), not_json.status, huge.status, good.status, reply,
                got, stop.status, stopped)

    (empty, no_token, bad, bad_body, not_json, huge, good, reply, got, stop, stopped) = _run_app(server, scenario)
    assert empty == {"timezone": BERLIN, "entries": [], "current": None, "next": None, "transitions": 0}
    assert no_token == 401 and bad == 400 and not_json == 400 and huge == 413 and good == 200 and stop == 200
    assert "schedule.entries[0] (09:30).days: unknown weekday 'xyz'" in bad_body["error"]
    assert reply["ok"] and reply["timezone"] == BERLIN  # --timezone fills in a body that names none
    assert got["entries"][0] == {"at": "09:30", "name": "morning", "prompt": "put prompt", "negative_prompt": None,
                                 "transition": "continue"}
    assert got["current"]["name"] == "morning" and got["current"]["latency_s"] == 0.0  # late from the PUT, not 09:30
    assert got["next"] == {"index": 1, "at": "20:00", "label": "20:00 on tue", "name": None,
                           "starts_at": "2026-12-08T20:00:00+01:00"}  # T0 is a Tuesday
    assert stopped["entries"] == [] and stopped["current"] is None and server.board.current.prompt == "put prompt"


def test_the_schedule_is_kept_across_a_restart_with_state_and_missed_starts_are_not_replayed(official_pipeline,
                                                                                            tmp_path):
    from skyrt.runtime.server import ServerConfig, StreamServer

    state = tmp_path / "state.json"
    config = ServerConfig(formats=("mjpeg",), state_path=state)
    schedule = sched({"at": "06:00", "prompt": "morning"}, {"at": "12:00", "prompt": "noon"},
                     {"at": "18:00", "prompt": "evening"})
    clock = FakeClock(T0)  # 10:00: morning

    def start(**kwargs) -> "StreamServer":
        server = StreamServer(official_pipeline, FAST, config, prompt=PromptChange("own"), clock=clock, **kwargs)
        shutil.rmtree(server.hls_folder, ignore_errors=True)  # never started: nothing else to stop
        return server

    first = start(schedule=schedule)
    assert first.board.current.prompt == "morning"
    first.board.set_prompt(PromptChange("manual"))
    first.save_state()
    saved = json.loads(state.read_text())["schedule"]
    assert saved["entries"][1] == {"at": "12:00", "prompt": "noon", "negative_prompt": None, "transition": "continue"}
    assert saved["applied"] == {"index": 0, "start": "2026-12-08T05:00:00+00:00"}

    again = start()  # no --schedule: the saved one runs; the same occurrence is active, the manual prompt stays
    assert again.schedule.schedule == schedule and again.board.current.prompt == "manual"

    clock.t = utc(2026, 12, 8, 18, 0)  # 19:00: noon and evening started while it was down
    later = start()
    assert later.board.current.prompt == "evening" and later.schedule.transitions == 1  # one switch, no replay
    assert later.schedule.current["block"] == 0 and later.schedule.current["start"] == utc(2026, 12, 8, 17, 0)

    later.schedule.set(None)  # stopped over HTTP (an empty PUT): it stays stopped after a restart
    later.save_state()
    assert start(schedule=schedule).schedule.schedule is None


def test_cli_refuses_schedule_with_playlist_and_a_bad_schedule_file_before_loading_a_model(tmp_path, capsys):
    from skyrt.runtime.cli import main

    playlist = tmp_path / "list.json"
    playlist.write_text('{"items": [{"prompt": "a", "duration_s": 10}]}')
    good = tmp_path / "day.json"
    good.write_text('{"entries": [{"at": "07:00", "prompt": "a"}]}')
    with pytest.raises(SystemExit, match="give --schedule or --playlist, not both"):
        main(["serve", "--model", str(tmp_path), "--no-token", "--schedule", str(good), "--playlist", str(playlist)])
    bad = tmp_path / "bad.json"
    bad.write_text('{"timezone": "Europe/Berlim", "entries": [{"at": "07:00", "prompt": "a"}]}')
    assert main(["serve", "--model", str(tmp_path), "--no-token", "--schedule", str(bad)]) == 2
    assert "bad.json: schedule.timezone: unknown time zone 'Europe/Berlim'" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--no-token", "--timezone", "Nowhere/City",
                 "--schedule", str(good)]) == 2
    assert "--timezone: unknown time zone 'Nowhere/City'" in capsys.readouterr().err


def test_the_readme_example_schedule_is_valid(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Schedules", 1)[1]
    example = tmp_path / "example.yaml"
    example.write_text(re.search(r"```yaml\n(.*?)```", section, re.S)[1])
    s = load_schedule(example)
    assert [e.label() for e in s.entries] == ["07:00 every day", "12:00 on mon,tue,wed,thu,fri", "18:30 every day",
                                              "09:00 on 2026-12-24"]
    assert prompt_at(s, utc(2026, 12, 8, 2, 0)) == "the lobby at night"  # 03:00 Tuesday: Monday's 18:30
    assert prompt_at(s, utc(2026, 12, 24, 10, 59)) == "snow on the roofs"  # 11:59 on the 24th (a Thursday)
    assert prompt_at(s, utc(2026, 12, 24, 11, 0)) == "playlist"  # the weekday 12:00 entry takes over


def test_an_entry_start_file_is_checked_up_front_and_a_schedule_with_a_playlist_is_refused(tmp_path):
    from skyrt.runtime.server import Limits, StreamServer
    from skyrt.runtime.server.playlist import parse_playlist

    limits = Limits(media_dir=str(tmp_path))
    with pytest.raises(RequestError, match=r"entries\[0\] \(07:00\)\.image: no file 'lobby\.png' in the media folder"):
        parse_schedule({"entries": [{"at": "07:00", "prompt": "the lobby", "image": "lobby.png"}]}, limits)
    with pytest.raises(RequestError, match=r"outside the media folder"):
        parse_schedule({"entries": [{"at": "07:00", "prompt": "x", "video": "../clip.mp4"}]}, limits)
    playlist = parse_playlist({"items": [{"prompt": "a", "duration_s": 10}]})
    with pytest.raises(ValueError, match="give a schedule or a playlist, not both"):
        StreamServer(None, {}, playlist=playlist, schedule=sched({"at": "07:00", "prompt": "a"}))
