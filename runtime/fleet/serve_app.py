"""A fleet as a Ray Serve application, for clusters that deploy Serve configs rather than run
`skyrt fleet up` (KubeRay's RayService, `serve deploy`):

    applications:
      - name: skyrt-fleet-lobby
        import_path: skyrt.runtime.fleet.serve_app:app
        route_prefix: /
        args: {config: /etc/skyrt/fleet.yaml}

Serve calls `app(args)` on the cluster when it deploys the config (again on every config update):
it brings up the fleet's controller and streams as `skyrt fleet up` does (streams whose config did
not change keep running) and returns the ingress. Serve's own HTTP options (host, port, proxy
location) then apply; the fleet config's `ingress.host/port/proxy_location` are `skyrt fleet up`'s.
"""
from __future__ import annotations

from .config import ConfigError, load_fleet_config


def app(args: dict):
    """The fleet ingress application for `args["config"]` (a fleet YAML path on the cluster's nodes)."""
    from .api import start_streams
    from .config import fleet_token
    from .ingress import ingress_deployment

    path = (args or {}).get("config")
    if not path:
        raise ConfigError("the fleet Serve application needs args: {config: /path/to/fleet.yaml}")
    config = load_fleet_config(path)
    if fleet_token(config)[1]:
        raise ConfigError(f"fleet {config.name!r}: a Serve-deployed fleet needs its control token given "
                          f"(token_file in the config, or $SKYRT_TOKEN on the cluster) or no_token: true; "
                          f"a generated one would never be shown")
    start_streams(config)
    return ingress_deployment(config.name, config.ingress.video)
