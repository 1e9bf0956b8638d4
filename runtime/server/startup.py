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
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

TOKEN_ENV = "SKYRT_TOKEN"


@dataclass(frozen=True)
class TokenChoice:
    token: str | None  # None: control endpoints are open
    generated: bool  # made up for this run: the operator learns it only from the start-up message


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
        return TokenChoice(value, False)
    if environ.get(TOKEN_ENV):
        return TokenChoice(environ[TOKEN_ENV].strip(), False)
    if token is not None:
        if not token:
            raise ValueError("--token must not be empty (pass --no-token to leave control open)")
        return TokenChoice(token, False)
    return TokenChoice(secrets.token_urlsafe(18), True)


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
