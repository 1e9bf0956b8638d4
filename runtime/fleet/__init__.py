"""`skyrt fleet`: many endless streams across GPUs and hosts, on Ray.

One stream is one `skyrt serve` in a named, detached Ray actor that owns one GPU (or a fixed number
of CPUs on a CPU-only node) and that Ray restarts, with its config, prompt and playlist position,
when its process or node dies. A Ray Serve deployment is the one HTTP front door: `/streams`,
`/metrics`, and under `/streams/{id}/` the endpoints of `skyrt serve`, with video bytes served by the
node that owns the stream (a 307 to it) unless the config asks the ingress to carry them.

    config.py        the fleet YAML, validated; a stream is the flags of `skyrt serve`
    store.py         the fleet's state file: configs, tokens, prompts, playlist positions, restarts
    stream_host.py   one stream in a process it does not own: server, watchdog, control push (no Ray)
    actors.py        FleetController and StreamActor (Ray)
    ingress.py       the Ray Serve ingress: routing, forwarding, redirects, merged metrics
    prometheus.py    merging the streams' metrics under a `stream` label
    api.py, cli.py   `connect`, `up`, `attach` -> Fleet.status/add/remove/down; `skyrt fleet ...`
    serve_app.py     the fleet as a Ray Serve application builder (KubeRay RayService, `serve deploy`)

Ray is needed only here (`pip install 'skyrt[fleet]'`); importing this package does not import it.
"""
from __future__ import annotations

from .config import ConfigError, FleetConfig, IngressConfig, StreamConfig, load_fleet_config, parse_fleet_config

__all__ = ["ConfigError", "FleetConfig", "IngressConfig", "StreamConfig", "attach", "connect", "load_fleet_config",
           "parse_fleet_config", "up"]


def __getattr__(name: str):
    """`connect`, `up` and `attach` import Ray: loaded on first use."""
    if name in ("connect", "up", "attach", "Fleet"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
