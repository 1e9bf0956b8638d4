"""A fleet's configuration: typed, validated at the edge, with errors that name the field and the fix.

    name: lobby                      # the fleet's name (several fleets may share a Ray cluster)
    address: 10.0.0.5:6379           # Ray cluster (optional; `skyrt fleet up` without one starts a local cluster)
    state_dir: /var/lib/skyrt/fleet  # on the head node: stream configs, prompts, playlist positions
    token_file: /etc/skyrt/token     # fleet-wide control token (else $SKYRT_TOKEN, else one generated at `up`)
    allowed_hosts: [screens.example.org]
    ingress: {host: 0.0.0.0, port: 8000, video: redirect}
    gpus: [{name: gpu0, memory: 24GiB, reserve: 1GiB}]   # logical GPUs: streams admitted while they fit
    defaults: {height: 128, width: 128, fps: 24}   # every stream starts from these
    streams:
      - id: lobby
        prompt: a red circle bouncing on a dark blue background
      - id: cafe
        playlist: {loop: true, items: [{prompt: a blue square orbiting, duration_s: 30}]}
        token_file: /etc/skyrt/cafe.token          # this stream's own token

A stream is a `skyrt serve` with the flags its keys name (`steps: 2` is `--steps 2`; see
SERVE_KEYS), plus where it runs (`gpus`, `cpus`) and its control state (`prompt`, `playlist`).
The serve flags are parsed by `skyrt serve`'s own parser, so a stream accepts exactly what the
command does and is built by the same code. The sampling keys a stream sets (its own or from
`defaults`) are the user's layer of its request (runtime/resolve.py), whatever their values: `shift: 8.0`
runs with 8 under a preset whose shift is 5.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..request import STREAM_EXCLUDED, cli_settings, setting_type
from ..server.playlist import Limits, RequestError, load_playlist, parse_playlist

NAMESPACE = "skyrt-fleet"  # the Ray namespace of every fleet's named actors
STREAM_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
FLEET_NAME = STREAM_ID
VIDEO_MODES = ("redirect", "proxy")
PROXY_LOCATIONS = ("HeadOnly", "EveryNode")
DEFAULT_STATE_DIR = "~/.local/state/skyrt/fleet"
DEFAULT_PROMPT = "a red circle bouncing on a dark blue background"

# Stream keys that are `skyrt serve` flags: value types as YAML gives them, flag = --key-with-dashes. The
# sampling keys are the serve command's sampling flags, from the request type (prompt apart: a control state).
SERVE_KEYS = {
    "model": str, "backend": str, "device": str, "preset": str,
    **{f.metadata["cli"].replace("-", "_"): setting_type(f)
       for f in cli_settings(exclude=(*STREAM_EXCLUDED, "prompt"))},
    "formats": list, "max_connections": int, "max_connections_per_address": int, "stall_timeout": float,
    "send_buffer_kib": int, "threads": int, "generator_stall": float,
    "snapshot_every": float,  # seconds between stream snapshots (store.py: kept beside the state file)
}
# Stream keys of the fleet itself.
FLEET_STREAM_KEYS = {"id", "prompt", "playlist", "token_file", "no_token", "gpus", "cpus", "precision"}
FLEET_KEYS = {"name", "address", "state_dir", "token_file", "no_token", "allowed_hosts", "ingress", "defaults",
              "streams", "gpus"}
GPU_KEYS = {"name", "memory", "reserve"}
INGRESS_KEYS = {"host", "port", "video", "proxy_location"}


class ConfigError(ValueError):
    """A fleet configuration that does not validate; the message names the field and the fix."""


MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB)?\s*$", re.IGNORECASE)
UNITS = {"gib": 1024 ** 3, "gb": 10 ** 9, "mib": 1024 ** 2, "mb": 10 ** 6}


def parse_memory(value, where: str) -> int:
    """Bytes of `24GiB`, `24 GB`, `512MiB` or a bare number of GiB."""
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a memory size like 24GiB, got {value!r}")
    if isinstance(value, (int, float)):
        value = str(value)
    match = MEMORY.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{where} must be a memory size like 24GiB, 24GB or 512MiB, got {value!r}")
    amount, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
    nbytes = int(amount * UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"{where} must be more than 0, got {value!r}")
    return nbytes


@dataclass(frozen=True)
class LogicalGpu:
    """One logical GPU of the fleet: its memory, and a reserve kept free (CUDA context, workspace)."""

    name: str
    memory_bytes: int
    reserve_bytes: int = 0

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserve_bytes


@dataclass(frozen=True)
class StreamConfig:
    """One stream: its id (URL path part and actor name), `skyrt serve` flags, control state and
    placement. Plain data (it travels to the Ray actor that runs the stream and into the state file)."""

    id: str
    serve: dict = field(default_factory=dict)  # SERVE_KEYS -> value
    prompt: str = DEFAULT_PROMPT
    playlist: dict | None = None  # the form PUT /playlist takes, validated
    token_file: str | None = None  # this stream's own token (read at `up`); else the fleet's
    no_token: bool = False
    gpus: float | None = None  # None: 1 for a cuda device, else 0
    cpus: float = 1.0
    # The precision its graphs / engines run at, for its memory plan (runtime/memory_plan.py); None: fp32 on
    # the CPU, bf16 on a GPU.
    precision_key: str | None = None

    @property
    def precision(self) -> str:
        if self.precision_key is not None:
            return self.precision_key
        return "bf16" if self.device.startswith("cuda") or self.backend == "tensorrt" else "fp32"

    @property
    def backend(self) -> str:
        return str(self.serve.get("backend", "torch"))

    @property
    def device(self) -> str:
        return str(self.serve.get("device", "cpu"))

    @property
    def num_gpus(self) -> float:
        """GPUs Ray reserves for the stream: one whole GPU per CUDA stream unless the config says
        otherwise (`gpus: 0.5` puts two streams on a GPU)."""
        if self.gpus is not None:
            return self.gpus
        return 1.0 if self.device.startswith("cuda") else 0.0

    def serve_argv(self) -> list[str]:
        """The `skyrt serve` flags of this stream (no prompt, playlist or token: those travel apart)."""
        argv: list[str] = []
        for key, value in self.serve.items():
            flag = "--" + key.replace("_", "-")
            if key == "formats":
                value = ",".join(value)
            argv += [flag, str(value)]
        return argv

    def control_source_hash(self) -> str:
        """A hash of the prompt and playlist the config declares: a saved state made from another
        declaration is stale (the operator edited the file), one made from this one wins at `up`."""
        declared = json.dumps({"prompt": self.prompt, "playlist": self.playlist}, sort_keys=True)
        return hashlib.sha256(declared.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "StreamConfig":
        return cls(**data)


@dataclass(frozen=True)
class IngressConfig:
    """The Ray Serve HTTP ingress: where it listens, and whether video bytes go through it."""

    host: str = "127.0.0.1"
    port: int = 8000
    # redirect: clients get a 307 to the node that owns the stream for MJPEG, fMP4 and HLS segments
    # (the bytes never cross the ingress); proxy: the ingress copies them (one reachable address, a
    # central hop per frame). benchmarks/fleet.py measures both.
    video: str = "redirect"
    proxy_location: str = "HeadOnly"  # Ray Serve's HTTP proxies: on the head node only, or on every node


@dataclass(frozen=True)
class FleetConfig:
    name: str = "default"
    address: str | None = None
    state_dir: str = DEFAULT_STATE_DIR
    token_file: str | None = None
    no_token: bool = False
    allowed_hosts: tuple[str, ...] = ()
    ingress: IngressConfig = field(default_factory=IngressConfig)
    streams: tuple[StreamConfig, ...] = ()
    # Logical GPUs with their memory (admission.py): empty, no admission by memory (Ray's GPU counts only).
    gpus: tuple = ()


# ---------------------------------------------------------------------------------------- parsing
def load_fleet_config(path: str | Path) -> FleetConfig:
    """Read and validate a fleet YAML (or JSON) file. Relative paths in it (playlist files, token
    files, state_dir) are relative to the file's folder."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"fleet config {path} not found; write one (see `skyrt fleet up --help` or the README)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    try:
        return parse_fleet_config(data, base=path.parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def parse_fleet_config(data, base: Path = Path(".")) -> FleetConfig:
    """A FleetConfig from the YAML's data (a mapping)."""
    _check_keys(data, FLEET_KEYS, "the fleet config")
    name = _name(data.get("name", "default"), "name", FLEET_NAME)
    defaults = data.get("defaults") or {}
    _check_keys(defaults, SERVE_KEYS.keys() | FLEET_STREAM_KEYS - {"id", "prompt", "playlist"}, "defaults")
    streams_data = data.get("streams") or []
    if not isinstance(streams_data, list):
        raise ConfigError(f"streams must be a list of streams, got {type(streams_data).__name__}")
    streams = tuple(parse_stream_config({**defaults, **_mapping(entry, f"streams[{i}]")}, base, f"streams[{i}]")
                    for i, entry in enumerate(streams_data))
    ids = [s.id for s in streams]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"stream ids must be unique; repeated: {duplicates}")
    allowed = data.get("allowed_hosts") or []
    if not isinstance(allowed, list) or not all(isinstance(h, str) and h for h in allowed):
        raise ConfigError(f"allowed_hosts must be a list of host names, got {allowed!r}")
    return FleetConfig(
        name=name, address=_optional_str(data.get("address"), "address"),
        state_dir=str(_path(data.get("state_dir", DEFAULT_STATE_DIR), base)),
        token_file=_token_file(data.get("token_file"), base, "token_file"),
        no_token=_bool(data.get("no_token", False), "no_token"),
        allowed_hosts=tuple(h.lower() for h in allowed),
        ingress=parse_ingress(data.get("ingress") or {}), streams=streams, gpus=parse_gpus(data.get("gpus")))


def parse_gpus(data) -> tuple:
    """The fleet's logical GPUs: a list of {name, memory, reserve?} (memory like 24GiB)."""
    if data is None:
        return ()
    if not isinstance(data, list) or not data:
        raise ConfigError(f"gpus must be a list of logical GPUs like [{{name: gpu0, memory: 24GiB}}], got {data!r}")
    gpus = []
    for i, entry in enumerate(data):
        where = f"gpus[{i}]"
        _check_keys(entry, GPU_KEYS, where)
        if "memory" not in entry:
            raise ConfigError(f"{where}: missing memory (e.g. memory: 24GiB)")
        name = _name(entry.get("name", f"gpu{i}"), f"{where}.name", STREAM_ID)
        try:
            memory = parse_memory(entry["memory"], f"{where}.memory")
            reserve = parse_memory(entry["reserve"], f"{where}.reserve") if "reserve" in entry else 0
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if reserve >= memory:
            raise ConfigError(f"{where}.reserve must be less than its memory")
        gpus.append(LogicalGpu(name, memory, reserve))
    names = [g.name for g in gpus]
    if len(set(names)) != len(names):
        raise ConfigError(f"gpus: names must be unique, got {names}")
    return tuple(gpus)


def parse_ingress(data) -> IngressConfig:
    _check_keys(data, INGRESS_KEYS, "ingress")
    ingress = IngressConfig(**data)
    if not isinstance(ingress.host, str) or not ingress.host:
        raise ConfigError(f"ingress.host must be an address to bind, e.g. 127.0.0.1 or 0.0.0.0; got {ingress.host!r}")
    if isinstance(ingress.port, bool) or not isinstance(ingress.port, int) or not 1 <= ingress.port <= 65535:
        raise ConfigError(f"ingress.port must be a port number 1..65535, got {ingress.port!r}")
    if ingress.video not in VIDEO_MODES:
        raise ConfigError(f"ingress.video must be one of {list(VIDEO_MODES)}, got {ingress.video!r}")
    if ingress.proxy_location not in PROXY_LOCATIONS:
        raise ConfigError(f"ingress.proxy_location must be one of {list(PROXY_LOCATIONS)}, "
                          f"got {ingress.proxy_location!r}")
    return ingress


def parse_stream_config(data, base: Path = Path("."), where: str = "stream") -> StreamConfig:
    """A StreamConfig from a mapping (a config file's entry merged over its defaults, or `fleet add`)."""
    _check_keys(data, SERVE_KEYS.keys() | FLEET_STREAM_KEYS, where)
    if "id" not in data:
        raise ConfigError(f"{where}: missing id (a name for the URL /streams/<id>/, e.g. id: lobby)")
    stream_id = _name(data["id"], f"{where}.id", STREAM_ID)
    where = f"stream {stream_id!r}"
    serve = {}
    for key, kind in SERVE_KEYS.items():
        if key in data and data[key] is not None:
            serve[key] = _typed(data[key], kind, f"{where}.{key}")
    prompt = data.get("prompt", DEFAULT_PROMPT)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}.prompt must be a non-empty string, got {prompt!r}")
    stream = StreamConfig(
        id=stream_id, serve=serve, prompt=prompt, playlist=_playlist(data.get("playlist"), base, where),
        token_file=_token_file(data.get("token_file"), base, f"{where}.token_file"),
        no_token=_bool(data.get("no_token", False), f"{where}.no_token"),
        gpus=None if data.get("gpus") is None else _amount(data["gpus"], f"{where}.gpus"),
        cpus=_amount(data.get("cpus", 1.0), f"{where}.cpus"), precision_key=_precision(data.get("precision"), where))
    check_serve_flags(stream)
    return stream


def _precision(value, where: str) -> str | None:
    from ..memory_plan import PRECISIONS

    if value is not None and value not in PRECISIONS:
        raise ConfigError(f"{where}.precision must be one of {list(PRECISIONS)}, got {value!r}")
    return value


def check_serve_flags(stream: StreamConfig):
    """Parse the stream's flags with `skyrt serve`'s parser (a bad value fails here, at `up`, not on a
    node later); returns the parsed namespace."""
    from ..cli import build_parser

    argv = stream.serve_argv()
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            args = build_parser().parse_args(["serve", *argv])
        except SystemExit:
            lines = errors.getvalue().strip().splitlines()
            raise ConfigError(f"stream {stream.id!r}: {lines[-1] if lines else 'bad serve setting'}") from None
    if stream.token_file and stream.no_token:
        raise ConfigError(f"stream {stream.id!r}: give token_file or no_token, not both")
    return args


# ----------------------------------------------------------------------------------------- fields
def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping (key: value lines), got {type(value).__name__}")
    return value


def _check_keys(data, allowed, where: str) -> None:
    _mapping(data, where)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _name(value, where: str, pattern: re.Pattern) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ConfigError(f"{where} must be 1-48 lower-case letters, digits, '-' or '_' (starting with a letter or "
                          f"digit), got {value!r}")
    return value


def _typed(value, kind, where: str):
    if kind is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where} must be a list like [mjpeg, hls], got {value!r}")
        return [v.strip() for v in items if v.strip()]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where} must be {'a number' if kind is float else 'an integer' if kind is int else 'text'}, "
                          f"got {value!r}")
    return value


def _require(value, ok: bool, where: str, what: str):
    """`value` if `ok`, else a ConfigError saying what `where` must be."""
    if not ok:
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    return value


def _optional_str(value, where: str) -> str | None:
    return _require(value, value is None or isinstance(value, str), where, "text")


def _bool(value, where: str) -> bool:
    return _require(value, isinstance(value, bool), where, "true or false")


def _amount(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where} must be a number >= 0, got {value!r}")
    return float(value)


def _path(value, base: Path) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"expected a path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() or str(value).startswith("~") else (base / path)


def _token_file(value, base: Path, where: str) -> str | None:
    if value is None:
        return None
    path = _path(value, base)
    if not path.is_file():
        raise ConfigError(f"{where}: {path} not found (write the token into it, one line)")
    return str(path.resolve())


def _playlist(value, base: Path, where: str) -> dict | None:
    """An inline playlist or a playlist file's path -> the validated JSON form (PUT /playlist's)."""
    if value is None:
        return None
    try:
        # A file is read as `skyrt serve --playlist FILE` reads it.
        playlist = load_playlist(_path(value, base)) if isinstance(value, str) else parse_playlist(value, Limits())
    except FileNotFoundError as err:
        raise ConfigError(f"{where}.playlist: {err}") from err
    except RequestError as err:
        raise ConfigError(f"{where}.{err}" if str(err).startswith("playlist") else f"{where}.playlist: {err}") from err
    if not playlist.items:
        raise ConfigError(f"{where}.playlist has no items; give at least one {{prompt, duration_s}}")
    return playlist.to_json()


def read_token(path: str | None) -> str | None:
    """The token in a token file (stripped); None for no file."""
    if path is None:
        return None
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(f"token file {path} is empty; write the token into it, or set no_token: true")
    return token


def fleet_token(config: FleetConfig, environ=os.environ) -> tuple[str | None, bool]:
    """(the fleet-wide token, whether it was generated here): token_file, else $SKYRT_TOKEN, else a
    new one (the caller prints it once); None with no_token."""
    from ..server.startup import resolve_token

    choice = resolve_token(token_file=Path(config.token_file) if config.token_file else None,
                           no_token=config.no_token, environ=environ)
    return choice.token, choice.generated
