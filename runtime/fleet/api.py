"""The fleet's Python API (what `skyrt fleet` calls): connect to a Ray cluster, bring a fleet up,
read its status, add and remove streams, bring it down.

    from skyrt.runtime.fleet import load_fleet_config, up
    fleet = up(load_fleet_config("fleet.yaml"), address="10.0.0.5:6379")
    print(fleet.url, fleet.status())
    fleet.down()
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from .config import NAMESPACE, ConfigError, FleetConfig, StreamConfig, fleet_token, read_token

log = logging.getLogger("skyrt.fleet")

CONTROLLER_READY_TIMEOUT_S = 60.0


def serve_app_name(fleet: str) -> str:
    return f"skyrt-fleet-{fleet}"


def connect(address: str | None = "auto", local_cpus: int | None = None, local_gpus: int | None = None) -> None:
    """Join the Ray cluster at `address` ("auto": the one started on this machine, or $RAY_ADDRESS),
    or with address None start a local one in this process (it ends with this process). Safe to
    call again in a process that is already connected."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"namespace": NAMESPACE, "logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        ray.init(include_dashboard=False, num_cpus=local_cpus, num_gpus=local_gpus, **quiet)
    else:
        ray.init(address=address, **quiet)


@dataclass
class Fleet:
    """A handle on a fleet that runs on the connected cluster."""

    name: str
    url: str | None = None
    token: str | None = None  # the fleet-wide token when it was generated at `up` (print it once)

    @property
    def controller(self):
        import ray

        from .actors import controller_name

        try:
            return ray.get_actor(controller_name(self.name), namespace=NAMESPACE)
        except ValueError:
            raise ConfigError(f"fleet {self.name!r} is not up on this Ray cluster (skyrt fleet up --config FILE)") \
                from None

    def status(self) -> list[dict]:
        """Every stream: state, node, GPUs, fps, clients, restarts (what GET /streams shows)."""
        import ray

        return ray.get(self.controller.status.remote())

    def add(self, stream: StreamConfig) -> None:
        """Start one more stream (its config is kept: it survives `down` + `up`)."""
        import ray

        controller = self.controller
        token = _stream_token(stream, ray.get(controller.fleet_token.remote()))
        ray.get(controller.add.remote(stream.to_json(), token))

    def remove(self, stream_id: str) -> None:
        """Stop a stream and forget it."""
        import ray

        ray.get(self.controller.remove.remote(stream_id))

    def down(self) -> list[str]:
        """Stop every stream and the ingress; configs, prompts and playlist positions stay in the
        state file for the next `up`. Returns the streams that were running."""
        import ray
        from ray import serve

        controller = self.controller
        stopped = ray.get(controller.down.remote())
        try:
            serve.delete(serve_app_name(self.name))
            if not serve.status().applications:
                serve.shutdown()
        except Exception as err:  # Serve already gone: nothing to remove
            log.info("fleet %s: ingress removal: %s", self.name, err)
        ray.kill(controller, no_restart=True)
        return stopped

    def wait_until(self, predicate, timeout: float = 120.0, poll_s: float = 1.0) -> list[dict]:
        """Poll `status()` until `predicate(status)` holds; returns that status (TimeoutError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"fleet {self.name}: condition not met within {timeout:g} s; last status: {status}")
            time.sleep(poll_s)


def attach(name: str = "default") -> Fleet:
    """The fleet `name` on the connected cluster."""
    fleet = Fleet(name)
    fleet.controller  # raises if it is not up
    return fleet


def up(config: FleetConfig, environ=os.environ, settings: dict | None = None) -> Fleet:
    """Bring `config`'s fleet up on the connected cluster (call `connect` first): its controller,
    every declared stream (plus streams added earlier and kept in its state file), and the ingress.
    Running it again applies a changed config (new streams start, changed ones restart).

    settings: StreamHost settings for every stream (bind, stall_s, position_push_s). By default a
    stream's server binds the address Ray knows its node by (never loopback: Ray replaces it with
    the machine's reachable address); `skyrt fleet up` on a local cluster passes bind=127.0.0.1, so a
    laptop's streams stay off the LAN like `skyrt serve`'s."""
    from ray import serve

    from .ingress import ingress_deployment

    token, generated = start_streams(config, environ, settings)
    ingress = config.ingress
    serve.start(proxy_location=ingress.proxy_location, http_options={"host": ingress.host, "port": ingress.port})
    serve.run(ingress_deployment(config.name, ingress.video), name=serve_app_name(config.name), route_prefix="/",
              blocking=False)
    host = "127.0.0.1" if ingress.host in ("0.0.0.0", "::") else ingress.host
    host = f"[{host}]" if ":" in host else host
    return Fleet(config.name, url=f"http://{host}:{ingress.port}", token=token if generated else None)


def start_streams(config: FleetConfig, environ=os.environ, settings: dict | None = None) -> tuple[str | None, bool]:
    """`up` without the ingress: the controller and the streams (idempotent: unchanged streams keep
    running). Returns the fleet-wide token and whether it was generated now."""
    import ray

    controller = _controller(config, settings)
    token, generated = fleet_token(config, environ)
    saved = ray.get(controller.fleet_token.remote())
    if generated and saved:
        token, generated = saved, False  # a token generated at an earlier `up` stays valid
    tokens = {s.id: _stream_token(s, token) for s in config.streams}
    done = ray.get(controller.apply.remote([s.to_json() for s in config.streams], tokens, token, config.gpus))
    for stream_id, why in done.get("refused", {}).items():
        log.warning("fleet %s: stream %s not started: %s", config.name, stream_id, why)
    return token, generated


def _controller(config: FleetConfig, settings: dict | None):
    """The fleet's controller: the running one, or a new one that loads the fleet's state file."""
    import ray

    from .actors import FleetController, controller_name

    try:
        return ray.get_actor(controller_name(config.name), namespace=NAMESPACE)
    except ValueError:
        pass
    controller = FleetController.options(name=controller_name(config.name), namespace=NAMESPACE,
                                         lifetime="detached").remote(
        config.name, config.state_dir, config.allowed_hosts, settings)
    ray.get(controller.stream_ids.remote(), timeout=CONTROLLER_READY_TIMEOUT_S)  # constructed: state file read
    return controller


def _stream_token(stream: StreamConfig, fleet_token_value: str | None) -> str | None:
    """A stream's control token: its own token file, none with no_token, else the fleet's."""
    if stream.no_token:
        return None
    if stream.token_file:
        return read_token(stream.token_file)
    return fleet_token_value
