"""`skyrt fleet`: many endless streams on a Ray cluster (Ray is imported only when a command runs).

    skyrt fleet up --config fleet.yaml                 # no address: a local cluster, until Ctrl-C
    skyrt fleet up --config fleet.yaml --address HOST:6379   # an existing cluster; returns once deployed
    skyrt fleet status [--name NAME] [--address ...] [--json]
    skyrt fleet add lobby2 --prompt "a green square" --set height=64 --set fps=12
    skyrt fleet remove lobby2
    skyrt fleet down
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import threading
from pathlib import Path

from .config import ConfigError, load_fleet_config, parse_stream_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `fleet` and its subcommands on the skyrt CLI's subparsers."""
    fleet = subparsers.add_parser("fleet", help="many endless streams across GPUs and hosts on Ray",
                                  description="Run a fleet of endless streams on a Ray cluster behind one Ray Serve "
                                              "ingress (install with: pip install 'skyrt[fleet]').")
    fleet.set_defaults(run=run)
    commands = fleet.add_subparsers(dest="fleet_command", required=True)

    up = commands.add_parser("up", help="start the fleet a config file describes (or apply a changed config)")
    up.add_argument("--config", type=Path, required=True, help="fleet YAML file")
    _add_address(up, "default: the config's address; with neither, a local cluster runs in this process "
                     "until Ctrl-C")
    up.add_argument("--local-cpus", type=int, default=None, help="CPUs of a local cluster (default: all cores)")
    up.add_argument("--local-gpus", type=int, default=None, help="GPUs of a local cluster (default: detected)")

    status = commands.add_parser("status", help="every stream: state, node, GPUs, fps, clients, restarts")
    _add_target(status)
    status.add_argument("--json", action="store_true", help="print JSON (what GET /streams shows)")

    add = commands.add_parser("add", help="start one more stream (kept across down + up)")
    add.add_argument("id", help="the stream's id (its URL is /streams/<id>/)")
    _add_target(add)
    add.add_argument("--prompt", default=None)
    add.add_argument("--playlist", type=Path, default=None, help="playlist JSON file")
    add.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a stream setting as in the config file, e.g. --set height=64 --set device=cuda "
                          "(repeatable)")
    add.add_argument("--token-file", type=Path, default=None, help="this stream's own token (default: the fleet's)")
    add.add_argument("--no-token", action="store_true", help="leave this stream's control endpoints open")

    remove = commands.add_parser("remove", help="stop a stream and forget it")
    remove.add_argument("id")
    _add_target(remove)

    down = commands.add_parser("down", help="stop every stream and the ingress (their configs and state are kept)")
    _add_target(down)
    return fleet


def _add_address(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--address", default=None, help=f"Ray cluster address (HOST:PORT, or auto); {default_help}")


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="the fleet's YAML file (for its name and address)")
    p.add_argument("--name", default=None, help="the fleet's name (default: the config's, else 'default')")
    _add_address(p, "default: the config's address, else $RAY_ADDRESS, else the cluster started on this machine")


def run(args) -> int:
    if importlib.util.find_spec("ray") is None:
        raise ValueError("skyrt fleet needs Ray: pip install 'skyrt[fleet]'")
    command = args.fleet_command
    if command == "up":
        return _up(args)
    name, address = _target(args)
    _connect(address)
    from .api import attach

    fleet = attach(name)
    if command == "status":
        return _print_status(fleet.status(), args.json)
    if command == "add":
        fleet.add(_stream_from_flags(args))
        print(f"stream {args.id} added to fleet {name}: /streams/{args.id}/")
        return 0
    if command == "remove":
        fleet.remove(args.id)
        print(f"stream {args.id} removed from fleet {name}")
        return 0
    stopped = fleet.down()
    print(f"fleet {name} is down ({len(stopped)} stream(s) stopped; configs and state kept for the next up)")
    return 0


def _target(args) -> tuple[str, str]:
    config = load_fleet_config(args.config) if args.config is not None else None
    name = args.name or (config.name if config else "default")
    address = args.address or (config.address if config else None) or os.environ.get("RAY_ADDRESS") or "auto"
    return name, address


def _connect(address: str | None, **local) -> None:
    from .api import connect

    try:
        connect(address, **local)
    except ConnectionError as err:
        raise ValueError(f"could not reach a Ray cluster at {address!r} ({err}); start one (ray start --head) or "
                         f"pass --address HOST:PORT") from err


def _up(args) -> int:
    from .api import up

    config = load_fleet_config(args.config)
    address = args.address or config.address
    _connect(address, local_cpus=args.local_cpus, local_gpus=args.local_gpus)
    # A local cluster: streams on loopback, like `skyrt serve` (the ingress binds what the config says).
    fleet = up(config, settings={"bind": "127.0.0.1"} if address is None else None)
    print(f"fleet {config.name}: {len(config.streams)} stream(s) at {fleet.url}/streams "
          f"(video: {config.ingress.video})")
    for stream in config.streams:
        print(f"    {fleet.url}/streams/{stream.id}/")
    if fleet.token:
        print(f"control token generated for this fleet (kept in its state file): {fleet.token}")
    if address is not None:
        return 0
    print("local cluster: Ctrl-C stops the fleet (its state is kept for the next up)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    fleet.down()
    import ray

    ray.shutdown()
    return 0


def _stream_from_flags(args):
    import yaml

    data: dict = {"id": args.id}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set height=64")
        data[key.strip()] = yaml.safe_load(value)
    if args.prompt is not None:
        data["prompt"] = args.prompt
    if args.playlist is not None:
        data["playlist"] = str(args.playlist)
    if args.token_file is not None:
        data["token_file"] = str(args.token_file)
    if args.no_token:
        data["no_token"] = True
    return parse_stream_config(data, Path.cwd(), f"stream {args.id!r}")


def _print_status(streams: list[dict], as_json: bool) -> int:
    if as_json:
        print(json.dumps(streams, indent=1))
        return 0
    print(f"{'stream':16} {'state':12} {'node':14} {'gpus':6} {'fps gen/out':>12} {'clients':>8} {'restarts':>8}")
    for s in streams:
        clients = sum((s.get("clients") or {}).values())
        fps = f"{s['generated_fps'] if s['generated_fps'] is not None else '-'}/{s['fps']}"
        print(f"{s['id']:16} {s['state']:12} {(s.get('node') or '-')[:12]:14} {','.join(s['gpus']) or '-':6} "
              f"{fps:>12} {clients:>8} {s['restarts']:>8}" + (f"  {s['error']}" if s.get("error") else ""))
    return 0 if all(s["state"] == "running" for s in streams) else 3

