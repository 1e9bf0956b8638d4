"""What `skyrt serve` settles around the stream: the control token, a clean SIGTERM while the model
still loads, and a quick exit once the server has shut down.

The token: control endpoints are guarded by default. Its sources, first found wins:
--no-token (open, said loudly at start), --token-file FILE, $SKYRT_TOKEN, --token T (shows in the
process list: for tests and throwaway runs), else one generated for this run and printed at start
as part of the page's URL (`http://127.0.0.1:8000/#token=...`), the way notebook servers do.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import stat
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

TOKEN_ENV = "SKYRT_TOKEN"

log = logging.getLogger("skyrt.server")


@dataclass(frozen=True)
class TokenChoice:
    token: str | None  # None: control endpoints are open
    generated: bool  # made up for this run: the operator learns it only from the start-up message
    warning: str | None = None  # something about where the token came from that the operator should fix


def resolve_token(token: str | None = None, token_file: Path | None = None, no_token: bool = False,
                  environ=os.environ) -> TokenChoice:
    """The control token from the flags and the environment (see the module docstring)."""
    given = [name for name, value in (("--no-token", no_token), ("--token-file", token_file), ("--token", token))
             if value]
    if len(given) > 1:
        raise ValueError(f"pass only one of {given}")
    if no_token:
        return TokenChoice(None, False)
    if token_file is not None:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--token-file {path}: no such file (write the token into it, one line)")
        value = path.read_text(encoding="utf-8").strip()
        if not value:
            raise ValueError(f"--token-file {path} is empty; write the token into it, or pass --no-token")
        warning = token_file_exposure(path)
        if warning is not None:
            log.warning("%s", warning)
        return TokenChoice(value, False, warning)
    if environ.get(TOKEN_ENV):
        return TokenChoice(environ[TOKEN_ENV].strip(), False)
    if token is not None:
        if not token:
            raise ValueError("--token must not be empty (pass --no-token to leave control open)")
        return TokenChoice(token, False)
    return TokenChoice(secrets.token_urlsafe(18), True)


def token_file_exposure(path: Path) -> str | None:
    """A warning if other users may read the token file (group or world permission bits), else None.
    The server still starts: the file may sit in a folder only its owner can enter, which this
    check does not look at."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return None
    who = " and ".join(name for name, bits in (("its group", 0o070), ("every user", 0o007)) if mode & bits)
    return (f"token file {path} is readable or writable by {who} (mode {mode:o}): anyone who can read it can "
            f"control the stream; restrict it with: chmod 600 {path}")


class StartupInterrupted(Exception):
    """SIGTERM arrived before the server was up (while the model loaded)."""


@contextmanager
def sigterm_sets(event: threading.Event):
    """Within the block, SIGTERM sets `event` instead of killing the process with the default
    action; whoever waits at start-up checks it and leaves cleanly (no exception is thrown into
    whatever code happens to run when the signal lands, such as a child process being handed its
    start-up data)."""
    def note(_signum, _frame):
        event.set()

    previous = signal.signal(signal.SIGTERM, note)
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_without_teardown(code: int = 0) -> NoReturn:
    """Exit the process now, skipping the interpreter's teardown.

    Called once the server has shut down (state written, HLS folder removed, threads stopped):
    nothing is left to clean up, yet tearing down torch and its siblings takes ~0.5-1 s here, and a
    SIGTERM'd server must be gone within 2 s whatever its clients do."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
