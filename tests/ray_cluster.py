"""A real multi-node Ray cluster on this machine for tests: `ray start --head` plus `ray start
--address` per extra node, each with a fixed CPU (and logical GPU) count, no dashboard.

Every node is started in a session of its own (setsid), and everything Ray starts for that node
(GCS, raylet, agents, workers, the Serve controller and proxies, our actors and their pipeline
children) stays in that session. So a node is "lost" by killing its session's processes, and
teardown kills exactly this cluster's processes and then checks that none is left — unlike
`ray stop --force`, which kills every Ray process on the machine, a neighbour's cluster included.

Token authentication is on, with a token of this cluster's own passed in the environment
(`auth_env()`: the nodes get it, and so must every driver that connects). Left to itself Ray
decides per process from whether ~/.ray/auth_token exists (a local `ray.init()` writes one), and a
head that found the file refuses a worker node that did not.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serving import free_port

RAY = str(Path(sys.executable).with_name("ray"))
# Fast failure detection (a lost node is declared dead in ~3 s, not ~30 s) and no idle workers
# started ahead of demand (each is a ~100 MB Python process on a 2-core machine).
RAY_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}
OBJECT_STORE_BYTES = 80 * 1024 * 1024


def session_processes(sid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in session `sid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


@dataclass
class Node:
    sid: int  # the session every process of this node lives in
    num_cpus: int
    num_gpus: int
    head: bool


class LocalRayCluster:
    """Start with `start_head`, grow with `add_node`, lose a node with `kill_node`, end with `stop`
    (which a test fixture calls in a finalizer, so it runs on failure too)."""

    def __init__(self):
        # Short: Ray's socket paths under it must stay below the 107-byte limit of a unix socket name.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="skr-", dir="/tmp"))
        self.address: str | None = None
        self.nodes: list[Node] = []
        self.token = secrets.token_hex(32)
        self.env = dict(os.environ, **RAY_ENV, **self.auth_env())
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)

    def auth_env(self) -> dict[str, str]:
        """What a driver's environment needs to connect to this cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _ray_start(self, args: list[str], head: bool, num_cpus: int, num_gpus: int) -> Node:
        proc = subprocess.Popen([RAY, "start", *args, f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
                                 "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={self.temp_dir}",
                                 f"--dashboard-agent-listen-port={free_port()}"],
                                env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        node = Node(proc.pid, num_cpus, num_gpus, head)
        self.nodes.append(node)  # registered first: a failed start is still torn down
        output, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{output[-3000:]}")
        return node

    def start_head(self, num_cpus: int, num_gpus: int = 0) -> str:
        port = free_port()
        self._ray_start(["--head", f"--port={port}", "--include-dashboard=false",
                         f"--ray-client-server-port={free_port()}"], True, num_cpus, num_gpus)
        self.address = f"127.0.0.1:{port}"
        return self.address

    def add_node(self, num_cpus: int, num_gpus: int = 0) -> Node:
        return self._ray_start([f"--address={self.address}"], False, num_cpus, num_gpus)

    def kill_node(self, node: Node) -> None:
        """Lose a node as a crash would: SIGKILL its raylet, agents and workers at once."""
        self._kill_sessions([node.sid])

    def stop(self) -> list[int]:
        """Kill every process of every node; returns the pids still alive after 15 s (should be [])."""
        sids = [node.sid for node in self.nodes]
        left = self._kill_sessions(sids)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left

    @staticmethod
    def _kill_sessions(sids: list[int], timeout: float = 15.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            pids = [pid for sid in sids for pid in session_processes(sid)]
            if not pids or time.monotonic() > deadline:
                return pids
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


@dataclass
class LocalFleet:
    """A `skyrt fleet up` with no cluster address, running (see `local_fleet`)."""

    proc: subprocess.Popen
    url: str  # the ingress
    log: Path  # the command's output

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:]

    def stop(self) -> None:
        """Ctrl-C, as a laptop user stops it: the fleet goes down, the cluster ends, exit status 0."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=60) == 0, self.log_tail()


@contextmanager
def local_fleet(folder: Path, port: int, *args: str, config: str = "fleet.yaml"):
    """Run `skyrt fleet up --config CONFIG --local-cpus 1 ARGS` in `folder`: the command starts a local
    Ray cluster of its own, in a session of its own. Yields a LocalFleet; on leaving, whatever the test
    did, no process of that session may remain (they are killed and the leak is an assertion).

    Token auth as Ray's local default, with the token given here: Ray would otherwise write one to ~/.ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SKYRT_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_enable_worker_prestart="0", RAY_prestart_worker_first_driver="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log_path = Path(folder) / f"up-{port}.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "skyrt.runtime.cli", "fleet", "up", "--config", config,
                                 "--local-cpus", "1", *args], cwd=folder, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield LocalFleet(proc, f"http://127.0.0.1:{port}", log_path)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            deadline = time.monotonic() + 30
            while session_processes(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            left = session_processes(proc.pid)
            for pid in left:  # never leave a cluster running, even when an assertion failed
                os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the local cluster outlived the command: {left}"
